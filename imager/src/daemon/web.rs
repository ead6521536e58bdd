//! The daemon's web server (hyper, HTTP/1.1; HTTPS with rustls when `web.tls_cert`/`tls_key` are
//! given): read-only.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | the status page ([`super::page`]) |
//! | `GET /metrics` | Prometheus metrics ([`super::metrics`]) |
//! | `GET /status.json` | the last status report, recent jobs, open alerts and events, as JSON |
//! | `GET /login`, `POST /login` | the login form (with a token only) |
//!
//! **Login token.** Beyond loopback the page requires HTTPS and a token (`web.token_file`, whose
//! first line is the token, at least 16 characters, readable by its owner only); on loopback a
//! token is required when one is configured. A request proves it with `Authorization: Bearer
//! TOKEN` (scripts, Prometheus' `bearer_token_file`) or with the session cookie the login form
//! sets (a browser: the token typed once). Anything else gets `401`.
//!
//! Connections are capped at 64 at once, and one request's headers must arrive within 10 s.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sa_engine::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::config::WebSettings;
use super::shared::{lock, Shared};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// The session cookie's name.
const COOKIE_NAME: &str = "sa_image_session";
/// The shortest token accepted.
const MIN_TOKEN: usize = 16;

/// What a login proves.
struct Auth {
    /// Keyed hash of the token (compared in constant time).
    token: blake3::Hash,
}

impl Auth {
    fn hash(token: &str) -> blake3::Hash {
        blake3::Hash::from(blake3::derive_key(
            "sa-image web token v1",
            token.as_bytes(),
        ))
    }

    /// The session cookie's value: a hash of the token (not the token itself).
    fn session(&self) -> String {
        blake3::hash(self.token.as_bytes()).to_hex().to_string()
    }

    fn allows(&self, req: &Request<Incoming>) -> bool {
        if let Some(v) = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            return v
                .strip_prefix("Bearer ")
                .is_some_and(|t| Auth::hash(t.trim()) == self.token);
        }
        let session = blake3::hash(self.token.as_bytes());
        req.headers()
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(&format!("{COOKIE_NAME}=")))
            .any(|v| blake3::Hash::from_hex(v).is_ok_and(|h| h == session))
    }
}

struct App {
    shared: Arc<Shared>,
    auth: Option<Auth>,
    https: bool,
}

/// A running web server.
pub struct Web {
    /// Its URL (`http://127.0.0.1:7711/`).
    pub url: String,
    stop: Shutdown,
    task: JoinHandle<()>,
}

impl Web {
    /// Stops accepting and ends the open connections.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn read_token(path: &Path) -> Result<String> {
    sa_core::keyfile::check_key_file_mode(path).map_err(|e| match e {
        sa_core::Error::InsecureKeyFile { mode, .. } => anyhow::anyhow!(
            "web.token_file {p} may be read by other users (mode {mode:03o}); run `chmod 600 {p}`",
            p = path.display()
        ),
        e => e.into(),
    })?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read web.token_file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < MIN_TOKEN {
        bail!(
            "the token in web.token_file {} is too short ({} characters; at least {MIN_TOKEN}): \
             make one with `head -c 24 /dev/urandom | base64 > {}`",
            path.display(),
            token.len(),
            path.display()
        );
    }
    Ok(token)
}

fn tls(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("web.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        bail!("web.tls_cert {} holds no certificate (PEM)", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("web.tls_key {}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("web.tls_cert and web.tls_key do not make a TLS identity")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Binds and serves (see the module docs).
pub async fn start(w: &WebSettings, shared: Arc<Shared>) -> Result<Web> {
    let auth = match &w.token_file {
        Some(p) => Some(Auth {
            token: Auth::hash(&read_token(p)?),
        }),
        None => None,
    };
    let acceptor = match &w.tls {
        Some((c, k)) => Some(tls(c, k)?),
        None => None,
    };
    let listener = TcpListener::bind(w.listen)
        .await
        .with_context(|| format!("cannot listen on {} (web.listen)", w.listen))?;
    let addr = listener.local_addr()?;
    let url = format!(
        "{}://{addr}/",
        if acceptor.is_some() { "https" } else { "http" }
    );
    let app = Arc::new(App {
        shared,
        auth,
        https: acceptor.is_some(),
    });
    let stop = Shutdown::new();
    let task = tokio::spawn(accept_loop(listener, acceptor, app, stop.clone()));
    Ok(Web { url, stop, task })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: Arc<App>,
    stop: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("web: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: dropped
        };
        let (app, acceptor, stop) = (app.clone(), acceptor.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| handle(app.clone(), req));
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10));
                b
            };
            let served = async {
                match acceptor {
                    Some(a) => {
                        match tokio::time::timeout(Duration::from_secs(10), a.accept(stream)).await
                        {
                            Ok(Ok(tls)) => {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                            _ => tracing::debug!("web: TLS handshake failed or timed out"),
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            };
            tokio::select! {
                () = served => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn respond(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(ctype) {
        h.insert(CONTENT_TYPE, v);
    }
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'",
        ),
    );
    r
}

const HTML: &str = "text/html; charset=utf-8";

fn login_page(status: StatusCode, note: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\"><title>Log in</title>\
         <style>body{{font:16px system-ui,sans-serif;max-width:420px;margin:40px auto;padding:0 16px}}\
         input{{font-size:16px;width:100%;padding:8px;margin:6px 0}}</style></head><body>\
         <h1>Backup status</h1><p>{note}</p><form method=post action=/login>\
         <label>Login token<input type=password name=token autocomplete=current-password></label>\
         <input type=submit value=\"Log in\"></form></body></html>"
    );
    let mut r = respond(status, HTML, body);
    r.headers_mut().insert(
        "www-authenticate",
        HeaderValue::from_static("Bearer realm=\"sa-image\""),
    );
    r
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/login" {
        return Ok(login(&app, req).await);
    }
    if let Some(auth) = &app.auth {
        if !auth.allows(&req) {
            let note = if req.headers().contains_key(AUTHORIZATION) {
                "Wrong token."
            } else {
                "Give the login token to see the backup status."
            };
            return Ok(login_page(StatusCode::UNAUTHORIZED, note));
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "read-only\n",
        ));
    }
    let shared = &app.shared;
    Ok(match path.as_str() {
        "/" => respond(StatusCode::OK, HTML, super::page::render(shared)),
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            super::metrics::render(shared),
        ),
        "/status.json" => respond(StatusCode::OK, "application/json", status_json(shared)),
        p if p.starts_with("/drill/") => match super::drill::screenshot(&shared.settings(), p) {
            Some(png) => respond(StatusCode::OK, "image/png", png),
            None => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        },
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

async fn login(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(auth) = &app.auth else {
        return redirect("/", None);
    };
    if req.method() != Method::POST {
        return login_page(
            StatusCode::OK,
            "Give the login token to see the backup status.",
        );
    }
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return respond(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", "too large\n"),
    };
    let token = form_value(&String::from_utf8_lossy(&body), "token").unwrap_or_default();
    if Auth::hash(token.trim()) != auth.token {
        return login_page(StatusCode::UNAUTHORIZED, "Wrong token.");
    }
    let cookie = format!(
        "{COOKIE_NAME}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000{}",
        auth.session(),
        if app.https { "; Secure" } else { "" }
    );
    redirect("/", Some(cookie))
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response<Full<Bytes>> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain", "");
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(SET_COOKIE, c);
    }
    r
}

/// The value of `key` in an `application/x-www-form-urlencoded` body.
fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| url_decode(v))
    })
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_json(shared: &Shared) -> String {
    let (report, checked, error, events, running, next, repair, bad) = shared.with_view(|v| {
        (
            v.status.clone(),
            v.checked_ms,
            v.check_error.clone(),
            v.events.iter().cloned().collect::<Vec<_>>(),
            v.running.clone(),
            v.next_runs.clone(),
            v.repair.clone(),
            v.scrub_bad,
        )
    });
    let jobs: Vec<_> = {
        let j = lock(&shared.journal);
        j.recent.iter().rev().take(100).cloned().collect()
    };
    let alerts = lock(&shared.state).alerts.clone();
    serde_json::json!({
        "status": report.as_deref(),
        "checked_ms": checked,
        "check_error": error,
        "running": running,
        "next_runs": next,
        "jobs": jobs,
        "alerts": alerts,
        "events": events,
        "repair": repair,
        "scrub_bad_shards": bad,
        "started_ms": shared.started_ms,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            form_value("a=1&token=ab%2Bc+d%3D", "token").as_deref(),
            Some("ab+c d=")
        );
        assert_eq!(form_value("token=x%", "token").as_deref(), Some("x%"));
        assert_eq!(form_value("token=x%4", "token").as_deref(), Some("x%4"));
        assert_eq!(form_value("nothing", "token"), None);
    }
}
