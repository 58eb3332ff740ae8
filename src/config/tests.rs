use std::path::Path;

use super::*;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="; // 32 × 0x01

fn base() -> String {
    format!(
        "[listen]\nhttp = \"127.0.0.1:8080\"\n\n[affinity]\nkeys = [\"{KEY}\"]\n\n\
         [[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:9001\"\n"
    )
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("test.toml"))
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = parse(&base()).unwrap();
    assert_eq!(c.listen.admin, "127.0.0.1:9900".parse().unwrap());
    assert_eq!(c.affinity.cookie, "tether");
    assert_eq!(c.affinity.ttl, Duration::from_secs(86_400));
    assert_eq!(c.affinity.refresh, Duration::from_secs(3600));
    assert_eq!(c.affinity.idle_timeout, None);
    assert_eq!(c.affinity.same_site, SameSite::Lax);
    assert_eq!(c.affinity.secure, SecureMode::Auto);
    assert!(c.affinity.http_only);
    assert_eq!(c.affinity.key, vec![KeySource::Cookie]);
    assert_eq!(c.affinity.on_worker_loss, OnWorkerLoss::Move);
    assert_eq!(c.balance.policy, Policy::LeastSessions);
    assert_eq!(c.backends[0].weight, 1);
    assert_eq!(
        (c.health.path.as_str(), c.health.fall, c.health.rise),
        ("/health", 3, 2)
    );
    assert_eq!(c.health.interval, Duration::from_secs(2));
    assert_eq!(c.passive.cooldown, Duration::from_secs(30));
    assert_eq!(c.drain.timeout, Duration::from_secs(600));
    assert_eq!(c.state.store.expose(), "sqlite://tether.db");
    assert_eq!(c.state.path, "/_tether");
    assert_eq!(c.state.retention, Duration::from_secs(7 * 86_400));
    assert_eq!(c.state.queue, 10_000);
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.max_header_bytes, 65_536);
    assert_eq!(c.limits.stream_idle, Duration::from_secs(900));
    assert_eq!(c.shutdown.grace, Duration::from_secs(30));
}

#[test]
fn bad_configs_name_the_key() {
    let dup = base() + "\n[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:9002\"\n";
    let cases: Vec<(String, &str)> = vec![
        (dup, "backends[1].id: duplicate id \"a\""),
        (
            base() + "\n[balance]\npolicy = \"random\"\n",
            "balance.policy",
        ),
        (base().replace(KEY, "c2hvcnQ="), "affinity.keys[0]"),
        (
            base().replace("[affinity]\n", "[affinity]\nsame_site = \"none\"\n"),
            "affinity.same_site",
        ),
        (
            base().replace(
                "[affinity]\n",
                "[affinity]\nsame_site = \"none\"\nsecure = \"false\"\n",
            ),
            "affinity.same_site",
        ),
        (base().replace("http = ", "https = "), "tls"),
        (
            base() + "\n[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            "tls.cert",
        ),
        (
            base().replace(
                "[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:9001\"\n",
                "",
            ),
            "backends",
        ),
        (
            base().replace("http://127.0.0.1:9001", "http://127.0.0.1:9001/api"),
            "backends[0].url",
        ),
        (
            base().replace("http://127.0.0.1:9001", "ftp://x:1"),
            "backends[0].url",
        ),
        (
            base() + "\n[limits]\nmax_header_bytes = 100\n",
            "limits.max_header_bytes",
        ),
        (
            base() + "\n[health]\ninterval = \"soon\"\n",
            "health.interval",
        ),
        (
            base().replace("[affinity]\n", "[affinity]\nkey = [\"query:x\"]\n"),
            "affinity.key[0]",
        ),
        (
            base().replace("http = \"127.0.0.1:8080\"", "http = \"localhost\""),
            "listen.http",
        ),
        (
            base().replace("[listen]\nhttp = \"127.0.0.1:8080\"\n", "[listen]\n"),
            "listen",
        ),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.contains(want), "wanted {want:?} in {e:?}");
    }
}

#[test]
fn unknown_keys_are_reported_with_their_line() {
    let e = err(&(base() + "\n[limits]\nmax_conections = 5\n"));
    assert!(e.contains("max_conections"), "{e}");
    assert!(e.contains("line 12"), "{e}");
}

#[test]
fn env_interpolation() {
    // Unique names: tests run in parallel in one process.
    let text = base().replace(KEY, "${TETHER_TEST_KEY_7F3A}");
    let e = err(&text);
    assert!(
        e.contains("affinity.keys[0]") && e.contains("TETHER_TEST_KEY_7F3A"),
        "{e}"
    );
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("TETHER_TEST_KEY_9B2C", KEY);
    let ok = parse(&base().replace(KEY, "${TETHER_TEST_KEY_9B2C}")).unwrap();
    assert_eq!(ok.affinity.keys[0].bytes(), &[1u8; 32]);
}

#[test]
fn secrets_do_not_print() {
    let c = parse(&(base() + "\n[admin]\ntoken = \"hunter2\"\n")).unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn the_committed_example_parses() {
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("TETHER_COOKIE_KEY", KEY);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tether.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.backends.len(), 3);
}
