//! The agent as a Windows service (`windows-service` crate).
//!
//! * `service install [FLAGS]` checks the flags as the agent would, makes the shard directory
//!   (default `%ProgramData%\sa-image\shards`) and gives only SYSTEM and Administrators access to
//!   it (`icacls`: Windows has no mode bits, and `identity.key` in it must not be readable by the
//!   PC's users), registers the service `sa-shard-agent` (LocalSystem, started at boot, restarted
//!   a minute after a failure) with the command line `shard-agent.exe service run FLAGS` (paths
//!   made absolute, the log to `%ProgramData%\sa-image\shard-agent.log` unless `--log-file` says
//!   otherwise), and starts it.
//! * `service uninstall` stops the service and removes it; the shard directory stays.
//! * `service run` is what the service manager starts: it connects to the manager's dispatcher,
//!   reports Running, runs the agent until a Stop or Shutdown control, and reports Stopped.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_dispatcher;
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use crate::agent::{self, Shutdown};
use crate::config::{program_data, AgentArgs, AgentConfig, ServiceCommand};

/// The service's name (`sc query sa-shard-agent`).
pub const SERVICE_NAME: &str = "sa-shard-agent";
const DISPLAY_NAME: &str = "sa-image shard agent";
const DESCRIPTION: &str =
    "Keeps encrypted backup shards of the office server on this PC (sa-image). \
     The shards are useless without the office's recovery key.";

/// The agent's settings, from `service run`'s flags, for the service's main function (which the
/// dispatcher calls without them).
static CONFIG: OnceLock<AgentConfig> = OnceLock::new();

pub fn main(cmd: ServiceCommand) -> ExitCode {
    match cmd {
        ServiceCommand::Install(args) => match args.resolve() {
            Ok(cfg) => crate::exit(install(args, &cfg)),
            Err(e) => crate::usage(e),
        },
        ServiceCommand::Uninstall => crate::exit(uninstall()),
        ServiceCommand::Run(args) => match args.resolve() {
            Ok(cfg) => {
                let _ = CONFIG.set(cfg);
                match service_dispatcher::start(SERVICE_NAME, ffi_service_main) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => crate::usage(anyhow!(
                        "`service run` is what the Windows service manager starts, and it did \
                         not start this one ({e}); install the service with `shard-agent service \
                         install`, or run the agent in a console with its flags alone"
                    )),
                }
            }
            Err(e) => crate::usage(e),
        },
    }
}

/// Windows' ERROR_ACCESS_DENIED and ERROR_SERVICE_DOES_NOT_EXIST.
const ACCESS_DENIED: i32 = 5;
const NO_SUCH_SERVICE: i32 = 1060;
/// ERROR_SERVICE_DATABASE_LOCKED: the manager is busy (starting services at boot, say).
const DATABASE_LOCKED: i32 = 1055;
/// ERROR_SERVICE_REQUEST_TIMEOUT: the service did not report running within the manager's wait.
const REQUEST_TIMEOUT: i32 = 1053;

fn manager_error(e: windows_service::Error, what: &str) -> anyhow::Error {
    match &e {
        windows_service::Error::Winapi(io) => match io.raw_os_error() {
            Some(ACCESS_DENIED) => {
                anyhow!("{what}: access denied: run this from an administrator prompt")
            }
            Some(NO_SUCH_SERVICE) => anyhow!("{what}: no service {SERVICE_NAME} is installed"),
            _ => anyhow!("{what}: {io}"),
        },
        _ => anyhow!("{what}: {e}"),
    }
}

fn install(mut args: AgentArgs, cfg: &AgentConfig) -> Result<()> {
    let base = program_data().join("sa-image");
    // Settled now: the service's environment may differ from this prompt's.
    if args.dir.is_none() {
        args.dir = Some(cfg.dir.clone());
    }
    if args.log_file.is_none() {
        args.log_file = Some(base.join("shard-agent.log"));
    }
    // The directory to close to other users: ours under ProgramData, or the one given.
    let private = if cfg.dir.starts_with(&base) {
        base.clone()
    } else {
        cfg.dir.clone()
    };
    std::fs::create_dir_all(&cfg.dir)
        .with_context(|| format!("cannot create {}", cfg.dir.display()))?;
    restrict_to_admins(&private)?;
    let mut launch: Vec<OsString> = vec!["service".into(), "run".into()];
    launch.extend(args.to_args()?);
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: std::env::current_exe().context("cannot find this program's path")?,
        launch_arguments: launch,
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .map_err(|e| manager_error(e, "cannot open the service manager"))?;
    let service = manager
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .map_err(|e| {
            manager_error(
                e,
                &format!(
                    "cannot create the service {SERVICE_NAME} (if it is installed already, \
                     `shard-agent service uninstall` first)"
                ),
            )
        })?;
    service
        .set_description(DESCRIPTION)
        .map_err(|e| manager_error(e, "cannot describe the service"))?;
    let restart = ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(60),
    };
    if let Err(e) = service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart.clone(), restart.clone(), restart]),
    }) {
        eprintln!("warning: the service will not be restarted after a failure: {e:#}");
    }
    start(&service).map_err(|e| manager_error(e, "installed, but the service did not start"))?;
    println!(
        "installed and started the service {SERVICE_NAME}: shards in {}, log in {}",
        cfg.dir.display(),
        args.log_file.as_deref().unwrap_or(Path::new("?")).display()
    );
    Ok(())
}

/// Starts the service and waits until it runs: up to 60 s while the manager's database is
/// locked (it is while the manager starts services, as at boot or right after Wine makes a
/// prefix), and up to 120 s more when the manager gave up waiting (its own limit is 30 s; a
/// first start under Wine takes about 40) but the service may still come up.
fn start(service: &windows_service::service::Service) -> windows_service::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        match service.start::<&str>(&[]) {
            Err(windows_service::Error::Winapi(e))
                if e.raw_os_error() == Some(DATABASE_LOCKED) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(250));
            }
            r => break r,
        }
    };
    let Err(windows_service::Error::Winapi(e)) = &started else {
        return started;
    };
    if e.raw_os_error() != Some(REQUEST_TIMEOUT) {
        return started;
    }
    eprintln!("the service is slow to start; waiting for it");
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if service
            .query_status()
            .is_ok_and(|s| s.current_state == ServiceState::Running)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    started
}

/// Gives only SYSTEM (S-1-5-18) and Administrators (S-1-5-32-544) access to `dir` and what it
/// will hold, dropping inherited entries (ProgramData lets every user read).
fn restrict_to_admins(dir: &Path) -> Result<()> {
    let out = std::process::Command::new("icacls")
        .arg(dir)
        .args([
            "/inheritance:r",
            "/grant:r",
            "*S-1-5-18:(OI)(CI)F",
            "*S-1-5-32-544:(OI)(CI)F",
        ])
        .output()
        .context("cannot run icacls to protect the shard directory")?;
    if !out.status.success() {
        bail!(
            "icacls could not restrict {} to SYSTEM and Administrators: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

fn uninstall() -> Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(|e| manager_error(e, "cannot open the service manager"))?;
    let service = manager
        .open_service(
            SERVICE_NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .map_err(|e| manager_error(e, "cannot remove the service"))?;
    let status = service
        .query_status()
        .map_err(|e| manager_error(e, "cannot query the service"))?;
    if status.current_state != ServiceState::Stopped {
        service
            .stop()
            .map_err(|e| manager_error(e, "cannot stop the service"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = service
                .query_status()
                .map_err(|e| manager_error(e, "cannot query the service"))?;
            if s.current_state == ServiceState::Stopped {
                break;
            }
            if Instant::now() > deadline {
                bail!("the service did not stop within 30 s; it was not removed");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    service
        .delete()
        .map_err(|e| manager_error(e, "cannot remove the service"))?;
    println!("removed the service {SERVICE_NAME} (its shard directory stays)");
    Ok(())
}

/// Called by the service dispatcher on a thread of its own. The arguments the service was
/// started with are not read (raw pointers; the flags came with `service run`).
extern "system" fn ffi_service_main(_argc: u32, _argv: *mut *mut u16) {
    if let Err(e) = service_main() {
        tracing::error!("service failed: {e:#}");
    }
}

fn status(state: ServiceState, code: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: ServiceExitCode::Win32(code),
        checkpoint: 0,
        wait_hint: Duration::from_secs(10),
        process_id: None,
    }
}

fn service_main() -> Result<()> {
    let cfg = CONFIG
        .get()
        .cloned()
        .ok_or_else(|| anyhow!("no agent settings"))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Mutex::new(Some(tx));
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            if let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(());
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let handle = service_control_handler::register(SERVICE_NAME, handler)
        .context("cannot register with the service manager")?;
    handle
        .set_service_status(status(ServiceState::Running, 0))
        .context("cannot report the service running")?;
    let stop = Shutdown::Future(Box::pin(async move {
        let _ = rx.await;
    }));
    let result = agent::run(cfg, stop);
    let code = u32::from(result.is_err());
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    handle
        .set_service_status(status(ServiceState::Stopped, code))
        .context("cannot report the service stopped")?;
    result
}
