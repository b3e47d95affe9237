//! AMQP 0-9-1 reply codes, as RabbitMQ uses them.

/// Normal close.
pub const SUCCESS: u16 = 200;
/// basic.return: the message could not be routed (mandatory).
pub const NO_ROUTE: u16 = 312;
/// Connection closed by the server (shutdown, admin).
pub const CONNECTION_FORCED: u16 = 320;
/// Permission denied (channel), or authentication failed (connection).
pub const ACCESS_REFUSED: u16 = 403;
/// No such exchange or queue.
pub const NOT_FOUND: u16 = 404;
/// Exclusive queue owned by another connection.
pub const RESOURCE_LOCKED: u16 = 405;
/// Equivalence check failed, queue not empty or in use, bad argument.
pub const PRECONDITION_FAILED: u16 = 406;
/// Malformed frame.
pub const FRAME_ERROR: u16 = 501;
/// Malformed method arguments.
pub const SYNTAX_ERROR: u16 = 502;
/// A method not allowed here (wrong state, unknown delivery tag on some paths).
pub const COMMAND_INVALID: u16 = 503;
/// Method on a channel that is not open, or opening one twice.
pub const CHANNEL_ERROR: u16 = 504;
/// A frame out of the expected order (content frames).
pub const UNEXPECTED_FRAME: u16 = 505;
/// Resource limits (channel_max).
pub const RESOURCE_ERROR: u16 = 506;
/// Vhost not allowed, or an operation the server does not allow.
pub const NOT_ALLOWED: u16 = 530;
/// Not implemented.
pub const NOT_IMPLEMENTED: u16 = 540;
/// Internal error (a store failure).
pub const INTERNAL_ERROR: u16 = 541;

/// The reply text prefix RabbitMQ uses for a code.
pub fn name(code: u16) -> &'static str {
    match code {
        SUCCESS => "OK",
        NO_ROUTE => "NO_ROUTE",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// Whether a code closes the connection (hard error) rather than the channel.
pub fn is_hard(code: u16) -> bool {
    matches!(code, CONNECTION_FORCED | 402 | FRAME_ERROR..=INTERNAL_ERROR)
}
