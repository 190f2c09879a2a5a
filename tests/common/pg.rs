//! A fresh PostgreSQL database per test, on the server named by
//! `TB_TEST_PG_URL` (`./scripts/test` sets it; see `scripts/pg-for-tests`).
//! A test that needs PostgreSQL and finds none fails: it never passes by
//! skipping.

use std::time::Duration;

use rand::Rng as _;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// The variable naming the test server (not `TOKENBROKER_*`: the broker's
/// config loader reads those).
pub const PG_URL_VAR: &str = "TB_TEST_PG_URL";
/// The server used when the variable is unset.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// The URL of the test server.
pub fn server_url() -> String {
    std::env::var(PG_URL_VAR).unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// A database `tb_<random>` created for one test and dropped (`WITH (FORCE)`,
/// so connections of killed replicas do not keep it) when this value drops.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    server: String,
    url: String,
}

impl TestDatabase {
    /// Creates the database; panics, naming `TB_TEST_PG_URL` and
    /// `./scripts/test`, when the server cannot be reached.
    pub async fn create() -> Self {
        let server = server_url();
        let suffix: u64 = rand::rng().random();
        let name = format!("tb_{suffix:016x}");
        let mut admin = admin_connection(&server).await;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {server}: {e}"));
        let _ = admin.close().await;
        let url = with_database(&server, &name);
        Self { name, server, url }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its connection URL (the server's URL with this database).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection to it, for the test's own queries.
    pub async fn connect(&self) -> PgConnection {
        tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect(&self.url))
            .await
            .unwrap_or_else(|_| panic!("connecting to {} timed out", self.url))
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and may run on a runtime thread: do it on a
        // thread of its own with its own runtime, and wait for it.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let mut admin = tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect(&server))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("could not drop test database {}: panicked", self.name),
        }
    }
}

async fn admin_connection(server: &str) -> PgConnection {
    let unreachable = |why: String| -> ! {
        panic!(
            "no PostgreSQL for the tests at {server} ({why}). Run the tests with ./scripts/test, \
             which finds or starts one, or set {PG_URL_VAR} to a server where they may create \
             and drop databases (default {DEFAULT_PG_URL})"
        )
    };
    match tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect(server)).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable(format!("no answer within {CONNECT_LIMIT:?}")),
    }
}

/// `server` with its database (the URL's path) replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut url = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}
