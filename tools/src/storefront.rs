//! The demo shop's web storefront: one HTML page, its script, stylesheet and logo,
//! embedded in the binary (no network, no files) and served at `/`. The page calls the
//! shop's JSON API (search, product, login, cart, checkout, account) with the token in
//! memory, so a browser recording of it is a real journey to import.
//!
//! Owns only the static files; it must not hold shop rules or count load (the service
//! counts these pages like its admin endpoints: in `requests`, in no endpoint).

/// `(content type, body)` of the storefront file at `path`, if there is one.
pub(crate) fn file(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_str!("storefront/index.html"),
        ),
        "/shop.js" => (
            "text/javascript; charset=utf-8",
            include_str!("storefront/shop.js"),
        ),
        "/shop.css" => (
            "text/css; charset=utf-8",
            include_str!("storefront/shop.css"),
        ),
        "/logo.svg" => ("image/svg+xml", include_str!("storefront/logo.svg")),
        _ => return None,
    })
}
