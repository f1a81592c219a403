//! The server side of `xe` (XenServer's thin-CLI protocol on `POST /cli`).

use crate::api::Server;
use crate::http::Origin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

pub async fn serve_cli<S: AsyncRead + AsyncWrite + Unpin + Send>(_server: Arc<Server>, _stream: S, _origin: Origin, _body: Vec<u8>) {}
