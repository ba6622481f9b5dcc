//! Scenario 13: the cost of TLS between `sluice local` and the server, beside clear text: one
//! download connection's throughput, tunnel set-up rate, and a limited user's accuracy through TLS.
//! Two servers share the benchmark's database: the usual clear-text one and one started with
//! `--tls-cert/--tls-key` (a certificate made here, as `sluice cert` would); each gets its own
//! `sluice local` (the TLS one with `--tls --pin-sha256`).

use crate::Ctx;
use crate::client::Dir;
use crate::origin::{Endpoint, Kind};
use crate::proxies::{Local, Server, UNLIMITED, User};
use crate::table::{Samples, Unit, Verdict};
use crate::throughput::{measure, setup_rate};
use std::time::Duration;

/// The limited user whose rate is measured through TLS, and its bandwidth.
const LIMITED: &str = "tls-limited";
const LIMITED_BW: u64 = 1 << 20;
/// Connections the limited user opens.
const LIMITED_CONNS: usize = 4;
/// The accuracy band the limiter holds in clear text (issue 3), asked of TLS too.
const BAND: (f64, f64) = (0.98, 1.02);

/// The users this scenario needs in the database.
pub fn users() -> Vec<User> {
    vec![(LIMITED.into(), LIMITED_BW)]
}

/// Scenario 13.
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    const NAME: &str = "13 · TLS between local and server";
    let (cert, key, pin) = sluice::net::tls::self_signed("localhost").map_err(|e| e.to_string())?;
    let (cert_path, key_path) = (ctx.dir.path("cert.pem"), ctx.dir.path("key.pem"));
    std::fs::write(&cert_path, cert).map_err(|e| format!("cert.pem: {e}"))?;
    std::fs::write(&key_path, key).map_err(|e| format!("key.pem: {e}"))?;
    let (plain_addr, db) = {
        let s = ctx.server()?;
        (s.addr, s.db.clone())
    };
    let tls_args = [
        "--tls-cert".to_string(),
        cert_path.display().to_string(),
        "--tls-key".to_string(),
        key_path.display().to_string(),
    ];
    let tls_server = Server::start_with(&ctx.bin, &db, &ctx.dir, "server-tls", &tls_args)?;
    let local_tls_args = [
        "--tls".to_string(),
        "--pin-sha256".to_string(),
        pin,
        "--server-name".to_string(),
        "localhost".to_string(),
    ];
    let plain = Local::start_with(
        &ctx.bin,
        plain_addr,
        UNLIMITED,
        &ctx.dir,
        "local-plain",
        &[],
    )?;
    let tls = Local::start_with(
        &ctx.bin,
        tls_server.addr,
        UNLIMITED,
        &ctx.dir,
        "local-tls",
        &local_tls_args,
    )?;
    let limited = Local::start_with(
        &ctx.bin,
        tls_server.addr,
        LIMITED,
        &ctx.dir,
        "local-tls-limited",
        &local_tls_args,
    )?;
    let echo = Endpoint::start(Kind::Echo)?;
    let mut s = [(); 6].map(|_| Samples::default());
    for _ in 0..ctx.cfg.runs {
        let (p, _) = measure(&ctx.cfg, &plain.route(), Dir::Down, 1, None)?;
        let (t, cpu) = measure(&ctx.cfg, &tls.route(), Dir::Down, 1, Some(&tls_server.proc))?;
        s[0].push(p);
        s[1].push(t);
        s[2].push(t / p);
        if let Some(c) = cpu {
            s[3].push(c);
        }
        let setup_len = ctx.cfg.setup.min(Duration::from_secs(2));
        let (rp, _) = setup_rate(&plain.route(), echo.addr(), setup_len);
        let (rt, _) = setup_rate(&tls.route(), echo.addr(), setup_len);
        s[4].push(rt / rp.max(1.0));
        s[5].push(rt);
    }
    // Over half the accuracy scenario's window (5 s in a full run), not the 1 s throughput one:
    // bytes sitting in socket buffers at the window's edges are a few percent of a short window.
    let mut acc_cfg = ctx.cfg.clone();
    acc_cfg.tput = ctx.cfg.accuracy / 2;
    let mut acc = Samples::default();
    for _ in 0..ctx.cfg.runs {
        let (rate, _) = measure(&acc_cfg, &limited.route(), Dir::Down, LIMITED_CONNS, None)?;
        acc.push(rate / LIMITED_BW as f64);
    }
    let t = &mut ctx.table;
    t.push(
        NAME,
        "throughput, 1 conn download via local",
        s[1].show(Unit::GBps),
        format!(
            "{} × clear text ({}) · TLS server {}",
            s[2].show(Unit::Ratio),
            s[0].show(Unit::GBps),
            s[3].show(Unit::CpuPerGb)
        ),
        Verdict::Info,
    );
    t.push(
        NAME,
        "set-up via local (TLS handshake per tunnel)",
        s[5].show(Unit::PerSec),
        format!("{} × clear text via local", s[4].show(Unit::Ratio)),
        Verdict::Info,
    );
    let m = acc.median();
    t.push(
        NAME,
        "accuracy through TLS, 1 MiB/s × 4 conns, download",
        acc.show(Unit::Ratio),
        format!("achieved / bw · target {:.2}–{:.2}", BAND.0, BAND.1),
        Verdict::of((BAND.0..=BAND.1).contains(&m)),
    );
    Ok(())
}
