//! The hosts an operation acts on: this one through its own drivers, the
//! other hosts of the pool through the pool link. Operations never compare
//! a host with "this host" themselves; they ask for the host's handle and
//! act through it.

use crate::context::Server;
use corral_agent::HostAgent;
use corral_model::{ApiError, errors};
use corral_net::HostNetwork;
use std::path::PathBuf;
use std::sync::Arc;

/// The drivers of one host, as operations reach them.
#[derive(Clone)]
pub struct HostHandle {
    /// The host's reference.
    pub host: String,
    /// Runs that host's VMs.
    pub agent: Arc<dyn HostAgent>,
    /// Makes that host's bridges.
    pub net: Arc<dyn HostNetwork>,
    /// Where that host keeps SR mounts and runtime files.
    pub state_dir: PathBuf,
}

impl HostHandle {
    pub fn is(&self, host: &str) -> bool {
        self.host == host
    }
}

/// Why another host's drivers cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no pool link to this host")]
    NoLink,
    #[error("the host does not answer: {0}")]
    Unreachable(String),
}

/// How this host reaches the drivers of the other hosts in its pool.
pub trait PoolLink: Send + Sync {
    fn connect(&self, host: &str) -> Result<HostHandle, LinkError>;
}

impl Server {
    /// This host's own drivers.
    pub fn local(&self) -> HostHandle {
        HostHandle {
            host: self.host_ref.clone(),
            agent: Arc::clone(&self.local_agent),
            net: Arc::clone(&self.local_net),
            state_dir: self.state_dir.clone(),
        }
    }

    /// The drivers of `host`: this host's own, or another's through the
    /// pool link (`CANNOT_CONTACT_HOST` when it cannot be reached).
    pub fn host(&self, host: &str) -> Result<HostHandle, ApiError> {
        if host == self.host_ref {
            return Ok(self.local());
        }
        let link = self
            .pool_link
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(link) = link else {
            return Err(errors::cannot_contact_host(host));
        };
        link.connect(host).map_err(|e| {
            tracing::info!(host = %host, error = %e, "cannot contact host");
            errors::cannot_contact_host(host)
        })
    }

    /// Installs the link to the pool's other hosts.
    pub fn set_pool_link(&self, link: Arc<dyn PoolLink>) {
        *self.pool_link.write().unwrap_or_else(|p| p.into_inner()) = Some(link);
    }
}
