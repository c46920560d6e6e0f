//! The API started for a running agent: its sockets opened first thing, then, once the daemon
//! has its state ready ([`ApiParts`]), the token, the guard and the API's threads.

use std::sync::Arc;

use anyhow::Context as _;

use super::{
    guard::Guard,
    listen::{self, Inherited, Listeners},
    server::Bounds,
    token::Token,
    ApiState, Predictive,
};
use crate::{
    config::Config,
    daemon::{ApiParts, ApiThread},
};

/// The API's sockets, before anything slow: the port and the local socket are the agent's from
/// its first moment (connections wait in the backlog until it serves). `inherited`: the sockets
/// a service manager handed over ([`Inherited::take_from_env`], taken before any thread started).
pub fn open_sockets(config: &Config, inherited: Inherited) -> anyhow::Result<Listeners> {
    for ignored in &inherited.ignored {
        tracing::warn!(
            "socket activation: {ignored} is not a stream socket the API serves: ignored"
        );
    }
    listen::open(&config.api, inherited).context("opening the API's sockets")
}

/// The API's threads on `listeners`, serving the daemon's `parts` until they say stop.
pub fn start(config: &Config, listeners: Listeners, parts: ApiParts) -> anyhow::Result<ApiThread> {
    let token = Token::load_or_create(&config.api.token_file)?;
    let local = listeners
        .tcp
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .context("the API's TCP address")?
        .unwrap_or(config.api.listen);
    say_where_the_api_listens(&local, &listeners);
    let guard = Arc::new(Guard::new(token, local, &config.api.allowed_hosts));
    let state = ApiState {
        store: parts.store,
        info: parts.info,
        predictive: Some(Predictive {
            policy: parts.policy,
            actuator: parts.actuator,
            reactive: config.reactive.clone(),
            limits_written: Some(parts.limits_written),
            admissions: Default::default(),
        }),
        retention_ms: u64::from(config.store.retention_days) * 86_400_000,
        pool: Some(parts.pool),
        snapshots: Default::default(),
    };
    let mut stop = parts.stop;
    super::spawn(listeners, state, guard, Bounds::default(), async move {
        let _ = stop.changed().await;
    })
    .context("starting the API's threads")
}

fn say_where_the_api_listens(local: &std::net::SocketAddr, listeners: &Listeners) {
    tracing::info!("API listening on http://{local}");
    match &listeners.local {
        Some((_, Some(path), _)) => tracing::info!("API socket at {}", path.display()),
        Some((_, None, _)) => tracing::info!("API socket handed over (no path)"),
        None => tracing::info!("API socket off (api.socket is empty): the CLI needs --addr"),
    }
    if listeners.inherited {
        tracing::info!("API sockets handed over by the service manager (socket activation)");
    }
}
