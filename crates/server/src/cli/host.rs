//! `xe` host and user commands: host-refresh-server-certificate,
//! host-shutdown-vms, user-create, user-password-change.

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError};
use crate::cli::protocol::Out;
use corral_model::args::{host, session, user};
use corral_model::refs::{Ref, classes};
use corral_model::schema::class;

impl CliCtx {
    /// `host=` (uuid) if given, else the host serving this command.
    async fn host_param(&self, cmd: &Cmd, param: &str) -> Result<Ref<classes::Host>, CliError> {
        Ok(Ref::new(match cmd.get(param) {
            Some(_) => self.ref_of(class::HOST, cmd, param).await?,
            None => self.server.host_ref.clone(),
        }))
    }

    pub(crate) async fn host_refresh_server_certificate(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let host = self.host_param(cmd, "host").await?;
        self.invoke(host::RefreshServerCertificate { host }).await?;
        Ok(())
    }

    /// Run by corral-host-shutdown.service on the host going down.
    pub(crate) async fn host_shutdown_vms(
        &self,
        _: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let host = Ref::new(self.server.host_ref.clone());
        self.invoke(host::ShutdownVms { host }).await?;
        Ok(())
    }

    pub(crate) async fn user_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        let r = self
            .invoke(user::CreateLocal {
                short_name: arg("user-name"),
                fullname: arg("fullname"),
                password: arg("password-new"),
                role: arg("role"),
            })
            .await?;
        out.push(Out::Print(self.uuid(class::USER, &r.db_string()).await?));
        Ok(())
    }

    pub(crate) async fn user_password_change(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        self.invoke(session::ChangePassword {
            old_pwd: arg("old"),
            new_pwd: arg("new"),
        })
        .await?;
        Ok(())
    }
}
