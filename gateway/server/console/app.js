// mqgate console (placeholder until the console lands)
