//! A client of the agent's socket, for `minivmm vm ...`: one HTTP/1.1 request per
//! connection (hyper), the response body handed over chunk by chunk as it comes
//! (so `console --follow` prints the guest's output as it is written).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot connect to the agent at {path}: {source} (is `minivmm serve` running? give --socket or set MINIVMM_SOCKET)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("the agent's answer was cut short: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Sends `method path` with an optional JSON body to the agent at `socket`, feeds
/// each chunk of the response body to `chunk` (with the response's status), and
/// returns the HTTP status.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    mut chunk: impl FnMut(u16, &[u8]),
) -> Result<u16, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "minivmm");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let mut resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        while let Some(frame) = resp.body_mut().frame().await {
            if let Some(data) = frame?.data_ref() {
                chunk(status, data);
            }
        }
        drop(send);
        let _ = conn.await;
        Ok(status)
    })
}

/// The agent's socket when none is given: $MINIVMM_SOCKET, else
/// $XDG_RUNTIME_DIR/minivmm/agent.sock, else ~/.local/state/minivmm/agent.sock.
pub fn default_socket() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("MINIVMM_SOCKET") {
        return PathBuf::from(p);
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("minivmm/agent.sock");
    }
    state_home().join("minivmm/agent.sock")
}

/// $XDG_STATE_HOME, else ~/.local/state, else /tmp.
pub fn state_home() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}
