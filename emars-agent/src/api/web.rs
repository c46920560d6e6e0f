//! The web page at `/`: a small read-only view of what the agent knows (functions at a glance;
//! a function's peak distribution with its limits drawn on it, its peaks and requests per
//! hour, its live instances against their limits, its limit writes and reactive actions). One
//! HTML file, one script and one style sheet, embedded in the binary: hosts running agents are
//! often offline, so nothing comes from elsewhere. The script only reads the JSON API.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};

const INDEX: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// The page's own script, styles and API only: no inline script or style, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/", tag = "web", responses((status = 200, description = "The web page (read-only; its script reads this API)", content_type = "text/html", body = String)))]
pub async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

#[utoipa::path(get, path = "/assets/app.js", tag = "web", responses((status = 200, description = "The web page's script", content_type = "text/javascript", body = String)))]
pub async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

#[utoipa::path(get, path = "/assets/app.css", tag = "web", responses((status = 200, description = "The web page's style sheet", content_type = "text/css", body = String)))]
pub async fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}
