//! `minivmm serve`: the host agent. An HTTP/1.1 JSON API on a Unix socket (axum on
//! a single-threaded tokio runtime; the blocking work of starting and stopping VM
//! processes runs on tokio's blocking threads) over a [`supervisor::Supervisor`]
//! that runs each VM as a `minivmm run` child process.
//!
//! | method and path                 | what                                          |
//! |---------------------------------|-----------------------------------------------|
//! | `POST /v1/vms`                  | create and start a VM ([`spec::VmSpec`])      |
//! | `GET /v1/vms`                   | every VM                                      |
//! | `GET /v1/vms/{name}`            | one VM: state, exit status, resources, uptime |
//! | `POST /v1/vms/{name}/stop`      | stop it (`?wait=1`: return once it ended)     |
//! | `DELETE /v1/vms/{name}`         | stop it, forget it, release its resources     |
//! | `GET /v1/vms/{name}/console`    | its console log (`?follow=1` streams it)      |
//! | `GET /v1/host`                  | this host's capacity and use in the ledger    |
//! | `GET /metrics`                  | Prometheus text format                        |
//!
//! Whoever can connect to the socket can start and stop VMs with the files in the
//! `--images` directories and nothing else: the socket is created mode 0600 (0660
//! for the members of `--group`).

pub mod cli;
pub mod client;
pub mod fleet;
pub mod spec;
pub mod supervisor;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use supervisor::{AgentConfig, Supervisor};

/// The largest request body the agent reads: a VM spec is a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;

/// An API error: its HTTP status and a message for the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or names files outside --images.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such VM or path.
    #[error("{0}")]
    NotFound(String),
    /// 409: the name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 422: the VM does not fit on this host (the ledger's reason).
    #[error("{0}")]
    Unprocessable(String),
    /// Another 4xx from the HTTP layer (413 body too large, 415 not JSON).
    #[error("{message}")]
    Rejected {
        /// The status.
        status: u16,
        /// Why.
        message: String,
    },
    /// 500: the agent failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Rejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message alone.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": self.message(), "status": status.as_u16()});
        (status, axum::Json(body)).into_response()
    }
}

/// How `minivmm serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The Unix socket to listen on.
    pub socket: PathBuf,
    /// A group whose members may use the socket too (mode 0660), or `None` (0600).
    pub group: Option<String>,
    /// The agent's settings.
    pub agent: AgentConfig,
}

/// Errors of `minivmm serve` before it serves.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be made.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The --group does not exist.
    #[error("no group named {0} on this host (--group)")]
    UnknownGroup(String),
    /// Another agent answers on the socket.
    #[error("another agent is already listening on {0}; stop it or give another --socket")]
    InUse(PathBuf),
    /// The agent's state could not be opened.
    #[error("cannot open the agent's state: {0}")]
    State(ApiError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs the agent until the process is killed. The VMs it started keep running
/// when it ends; the next agent on the same --state-dir adopts them.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    // A bad --group is refused before anything is created.
    let gid = opts.group.as_deref().map(group_id).transpose()?;
    let follow = opts.agent.fleet.clone();
    let sup = Supervisor::open(opts.agent).map_err(ServeError::State)?;
    if let Some(f) = follow {
        log::info!(
            "following pool {} as host {}",
            crate::pool::postgres::redact(&f.url),
            f.host
        );
        fleet::follow(sup.clone(), f).map_err(ServeError::Runtime)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let listener = listen(&opts.socket, gid)?;
        log::info!("serving on {}", opts.socket.display());
        axum::serve(listener, router(sup))
            .await
            .map_err(|source| ServeError::Listen {
                path: opts.socket.clone(),
                source,
            })
    })
}

/// The id of group `name` (getgrnam(3)).
fn group_id(name: &str) -> Result<libc::gid_t, ServeError> {
    let unknown = || ServeError::UnknownGroup(name.to_string());
    let c = std::ffi::CString::new(name).map_err(|_| unknown())?;
    // SAFETY: a valid C string; the result is read at once, before any other
    // getgr* call could reuse its static storage (the runtime has no other threads
    // yet that call it).
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(unknown());
    }
    // SAFETY: non-null, as checked.
    Ok(unsafe { (*gr).gr_gid })
}

/// Binds the socket, mode 0600 (0660 and owned by group `gid` when given),
/// replacing a stale socket file left by an agent that died (but never one another
/// agent still answers on).
fn listen(path: &Path, gid: Option<libc::gid_t>) -> Result<tokio::net::UnixListener, ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::InUse(path.to_path_buf()));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    // The socket file gets the mode the umask leaves: 0600 from the start, not
    // after a chmod that a client could race.
    // SAFETY: umask(2) only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(listen_err)?;
    if let Some(gid) = gid {
        // The group first, then the mode: members get in only once both are set.
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(listen_err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(listen_err)?;
    }
    Ok(listener)
}

/// The API's routes over `sup`.
pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(delete_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/host", get(host))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such path; see /v1/vms".into()) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(sup)
}

type Shared = State<Arc<Supervisor>>;

/// Runs a blocking supervisor call on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("the request's task failed: {e}")))?
}

async fn list_vms(State(sup): Shared) -> Response {
    axum::Json(sup.list()).into_response()
}

async fn create_vm(
    State(sup): Shared,
    body: Result<axum::Json<spec::VmSpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    // axum answers a well-formed body of the wrong shape with 422; here 422 means
    // only "it does not fit on this host", so that is a 400.
    let axum::Json(spec) = body.map_err(|r| match r.status().as_u16() {
        422 => ApiError::BadRequest(r.body_text()),
        status => ApiError::Rejected {
            status,
            message: r.body_text(),
        },
    })?;
    let vm = blocking(move || sup.create(spec)).await?;
    Ok((StatusCode::CREATED, axum::Json(vm)).into_response())
}

async fn show_vm(State(sup): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(sup.get(&name)?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StopQuery {
    #[serde(default)]
    wait: Option<u8>,
}

async fn stop_vm(
    State(sup): Shared,
    UrlPath(name): UrlPath<String>,
    q: Result<Query<StopQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::BadRequest(r.body_text()))?;
    let wait = q.wait.unwrap_or(0) != 0;
    let vm = blocking(move || sup.stop(&name, wait)).await?;
    let status = if wait {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, axum::Json(vm)).into_response())
}

async fn delete_vm(
    State(sup): Shared,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    blocking(move || sup.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    #[serde(default)]
    follow: Option<u8>,
}

/// The console log, streamed in chunks (the guest decides its size: it is never
/// read into memory whole); with `follow=1` the response stays open and carries
/// what the guest writes until the VM ends (or the client goes).
async fn console(
    State(sup): Shared,
    UrlPath(name): UrlPath<String>,
    q: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::BadRequest(r.body_text()))?;
    let path = sup.console_path(&name)?;
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let follow = q.follow.unwrap_or(0) != 0;
    // Without follow: what is there now, not what a busy guest adds while it is sent.
    let mut left = if follow {
        u64::MAX
    } else {
        std::fs::metadata(&path).map_or(0, |m| m.len())
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut file = None;
        while left > 0 {
            // Looked at before the read: a VM that ended has written all it will.
            let live = follow && sup.is_live(&name);
            if file.is_none() {
                file = std::fs::File::open(&path).ok();
            }
            let mut chunk = vec![0u8; (16 * 1024).min(left) as usize];
            let n = file
                .as_mut()
                .and_then(|f| f.read(&mut chunk).ok())
                .unwrap_or(0);
            if n > 0 {
                left -= n as u64;
                chunk.truncate(n);
                if tx.send(hyper::body::Bytes::from(chunk)).await.is_err() {
                    return; // the client went away
                }
                continue;
            }
            if !live {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok((text, axum::body::Body::new(Follow(rx))).into_response())
}

/// A response body fed by a channel: each message is one chunk.
struct Follow(tokio::sync::mpsc::Receiver<hyper::body::Bytes>);

impl http_body::Body for Follow {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}

async fn host(State(sup): Shared) -> Result<Response, ApiError> {
    let h = blocking(move || sup.host()).await?;
    Ok(axum::Json(h).into_response())
}

async fn metrics(State(sup): Shared) -> Result<Response, ApiError> {
    let m = blocking(move || Ok(sup.metrics())).await?;
    let ct = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    Ok((ct, m).into_response())
}
