//! The web console: a small static bundle (`gateway/server/console/`, plain HTML, CSS
//! and JavaScript committed as source, no build step) served by the admin listener at
//! `/console/`. It logs in with the API's users (HTTP basic auth on every call it makes)
//! and uses mqgate's own API and RabbitMQ's management API; the files themselves hold no
//! data and need no login. `MQGATE_CONSOLE_DIR` serves them from a folder instead of
//! the copies built into the binary (for working on the console).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../console/style.css"),
    ),
];

/// `/` and `/console/...`.
pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| file(Path("index.html".to_owned()))))
        .route("/console/{file}", get(file))
}

async fn file(Path(name): Path<String>) -> Response {
    let Some((_, mime, embedded)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body = match std::env::var_os("MQGATE_CONSOLE_DIR") {
        Some(dir) => match std::fs::read_to_string(std::path::Path::new(&dir).join(&name)) {
            Ok(b) => b,
            Err(_) => return StatusCode::NOT_FOUND.into_response(),
        },
        None => (*embedded).to_owned(),
    };
    (
        [
            (header::CONTENT_TYPE, *mime),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
