//! SIGINT / SIGTERM for `sluice server`: blocked in every thread, then taken by one thread with
//! sigwait, which asks the server to stop (so usage is flushed and the exit status is 0).

use sluice::server::Stopper;

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it fully.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it spawns afterwards. Call before
/// starting the server.
///
/// # Errors
/// The mask could not be set (then a signal would kill the process without a last flush).
pub fn block_stop_signals() -> std::io::Result<()> {
    let set = stop_set();
    // SAFETY: pthread_sigmask reads a valid set; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // pthread_sigmask returns the error number instead of setting errno.
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Starts a thread that waits for SIGINT or SIGTERM and then stops the server.
pub fn stop_on_signal(stopper: Stopper) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let set = stop_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads a valid set and writes one int.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                log::info!("signal {sig} received");
                stopper.stop();
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot watch for SIGTERM ({e}); the server will stop without a last flush");
    }
}
