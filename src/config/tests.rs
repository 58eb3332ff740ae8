//! Config tests: every bad value is reported under its key, every default is
//! the documented one, and the committed example parses.

use std::path::Path;

use super::*;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="; // 32 × 0x01
const BACKEND_A: &str = "[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:9001\"\n";

/// A minimal valid config: one listener, one key, one worker.
fn base() -> String {
    format!("[listen]\nhttp = \"127.0.0.1:8080\"\n\n[affinity]\nkeys = [\"{KEY}\"]\n\n{BACKEND_A}")
}

/// `base()` with `lines` added to `[section]` ("" appends to `[[backends]]`).
fn with(section: &str, lines: &str) -> String {
    match section {
        "affinity" => base().replace("[affinity]\n", &format!("[affinity]\n{lines}\n")),
        "" => format!("{}{lines}\n", base()),
        s => format!("{}\n[{s}]\n{lines}\n", base()),
    }
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

/// `base()` with the worker URL replaced.
fn url(url: &str) -> String {
    base().replace("http://127.0.0.1:9001", url)
}

/// Sets a variable that no other test reads (tests share one process).
#[allow(clippy::disallowed_methods)]
fn set_env(name: &str, value: &str) {
    std::env::set_var(name, value);
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = parse(&base()).unwrap();
    let secs = Duration::from_secs;
    assert_eq!(c.runtime.threads, None);
    assert_eq!(c.listen.admin, "127.0.0.1:9900".parse().unwrap());
    assert_eq!(c.listen.https, None);
    assert!(c.listen.trusted_proxies.is_empty());
    assert_eq!(c.limits.max_request_line_bytes, 8192);
    assert!(!c.limits.allow_underscore_headers);
    assert!(c.tls.is_none() && c.discovery.is_none() && c.admin.token.is_none());
    let a = &c.affinity;
    assert_eq!(a.cookie, "tether");
    assert_eq!(
        (a.ttl, a.refresh, a.idle_timeout),
        (secs(86_400), secs(3600), None)
    );
    assert_eq!((a.same_site, a.secure), (SameSite::Lax, SecureMode::Auto));
    assert!(a.http_only);
    assert_eq!((a.path.as_str(), a.domain.as_deref()), ("/", None));
    assert_eq!(a.key, vec![KeySource::Cookie]);
    assert_eq!(a.on_worker_loss, OnWorkerLoss::Move);
    assert_eq!(
        (c.balance.policy, c.balance.key.clone()),
        (Policy::LeastSessions, None)
    );
    assert_eq!(c.backends[0].weight, 1);
    let h = &c.health;
    assert_eq!((&*h.path, h.fall, h.rise), ("/health", 3, 2));
    assert_eq!((h.interval, h.timeout), (secs(2), secs(1)));
    assert_eq!((c.passive.failures, c.passive.cooldown), (3, secs(30)));
    assert_eq!(c.drain.timeout, secs(600));
    let s = &c.state;
    assert_eq!(
        (s.store.expose(), s.path.as_str()),
        ("sqlite://tether.db", "/_tether")
    );
    assert!(s.token.is_none());
    assert_eq!(s.on_restore_failure, OnRestoreFailure::Unavailable);
    assert_eq!(
        (s.restore_timeout, s.retention),
        (secs(5), secs(7 * 86_400))
    );
    assert_eq!(s.queue, 10_000);
    let l = &c.limits;
    assert_eq!((l.max_connections, l.max_header_bytes), (10_000, 65_536));
    assert_eq!((l.header_timeout, l.idle_timeout), (secs(10), secs(60)));
    assert_eq!((l.stream_idle, l.connect_timeout), (secs(900), secs(5)));
    assert_eq!(l.max_body_bytes, None);
    assert_eq!((l.retry_body_bytes, l.max_attempts), (65_536, 3));
    assert_eq!(l.max_sessions, 1_000_000);
    assert_eq!(s.max_export_bytes, 64 << 20);
    assert_eq!(c.shutdown.grace, secs(30));
    assert_eq!(c.shutdown.upgrade_timeout, secs(60));
}

/// Runs `section | lines | expected error prefix` rows through `with`.
fn table(rows: &[&str]) {
    for row in rows {
        let cols: Vec<&str> = row.split(" | ").map(str::trim).collect();
        let [section, lines, want] = cols[..] else {
            panic!("bad row {row:?}");
        };
        let section = section.trim_matches('-');
        let e = err(&with(section, lines));
        assert!(e.starts_with(want), "wanted {want:?} in {e:?}");
        assert!(!e.contains("hunter2"), "secret in {e:?}");
    }
}

#[test]
fn bad_values_name_their_key() {
    table(&[
        "runtime   | threads = 0                         | runtime.threads:",
        "admin     | token = ''                          | admin.token:",
        "affinity  | same_site = 'none'\nsecure = 'false' | affinity.same_site:",
        "affinity  | same_site = 'none'\nsecure = false   | affinity.same_site:",
        r#"affinity | same_site = 'none'                  | affinity.same_site: "none" needs secure"#,
        "affinity  | cookie = 'a=b'                      | affinity.cookie:",
        "affinity  | cookie = ''                         | affinity.cookie:",
        "affinity  | path = 'app'                        | affinity.path:",
        "affinity  | domain = 'a.com; x'                 | affinity.domain:",
        "affinity  | ttl = '0s'                          | affinity.ttl: must be greater than zero",
        "affinity  | refresh = 'soon'                    | affinity.refresh:",
        "affinity  | key = ['cookie', 'query:x']         | affinity.key[1]:",
        "affinity  | key = ['header:bad name']           | affinity.key[0]:",
        "affinity  | key = []                            | affinity.key:",
        "balance   | key = 'query:x'                     | balance.key:",
        "--------- | weight = 0                          | backends[0].weight:",
        "discovery | port = 9000                         | discovery.dns:",
        "discovery | dns = 'w.internal'                  | discovery.port:",
        "health    | interval = 'soon'                   | health.interval:",
        "health    | timeout = '0ms'                     | health.timeout:",
        "health    | fall = 0                            | health.fall:",
        "health    | rise = 0                            | health.rise:",
        "health    | path = 'health'                     | health.path:",
        "passive   | failures = 0                        | passive.failures:",
        "state     | store = 'mysql://u:hunter2@db/x'    | state.store:",
        "state     | path = '_tether'                    | state.path:",
        "state     | path = '/'                          | state.path:",
        "state     | queue = 0                           | state.queue:",
        "limits    | max_connections = 0                 | limits.max_connections:",
        "limits    | max_header_bytes = 100              | limits.max_header_bytes:",
        "limits    | max_header_bytes = 2000000          | limits.max_header_bytes:",
        "limits    | connect_timeout = '0s'              | limits.connect_timeout:",
        "limits    | max_attempts = 0                    | limits.max_attempts:",
        "limits    | retry_body_bytes = -1               | limits.retry_body_bytes:",
        "limits    | max_sessions = 0                    | limits.max_sessions:",
        "state     | max_export_bytes = 10               | state.max_export_bytes:",
        "shutdown  | grace = 'forever'                   | shutdown.grace:",
        "shutdown  | upgrade_timeout = '0s'              | shutdown.upgrade_timeout:",
    ]);
}

#[test]
fn bad_files_name_the_key() {
    let no_backends = base().replace(BACKEND_A, "");
    let cases = [
        (
            base() + "\n" + BACKEND_A,
            "backends[1].id: duplicate id \"a\"",
        ),
        (base().replace("http = \"127.0.0.1:8080\"\n", ""), "listen:"),
        (
            base().replace("127.0.0.1:8080", "localhost"),
            "listen.http:",
        ),
        (
            base().replace("http = ", "https = "),
            "tls: listen.https needs [tls]",
        ),
        (
            base().replace(KEY, "c2hvcnQ="),
            "affinity.keys[0]: decodes to 5 bytes",
        ),
        (
            base().replace(KEY, "not base64!"),
            "affinity.keys[0]: not valid base64",
        ),
        (base().replace(&format!("\"{KEY}\""), ""), "affinity.keys:"),
        (no_backends.clone(), "backends:"),
        (
            no_backends.clone() + "[[backends]]\nurl = \"http://h:1\"\n",
            "backends[0].id:",
        ),
        (
            no_backends + "[[backends]]\nid = \"a/b\"\nurl = \"http://h:1\"\n",
            "backends[0].id:",
        ),
        (url("http://127.0.0.1:9001/api"), "backends[0].url:"),
        (url("ftp://x:1"), "backends[0].url:"),
        (
            url("https://x:1"),
            "backends[0].url: https to workers is not supported",
        ),
        (url("http://:9001"), "backends[0].url:"),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.starts_with(want), "wanted {want:?} in {e:?}");
    }
}

#[test]
fn enum_errors_list_the_accepted_values() {
    table(&[
        r#"affinity | same_site = 'x' | affinity.same_site: "x" is not one of "strict", "lax", "none""#,
        r#"affinity | secure = 'x' | affinity.secure: "x" is not one of "auto", "true", "false""#,
        r#"affinity | on_worker_loss = 'x' | affinity.on_worker_loss: "x" is not one of "move", "fail""#,
        r#"balance | policy = 'x' | balance.policy: "x" is not one of "least-sessions", "#,
        r#"state | on_restore_failure = 'x' | state.on_restore_failure: "x" is not one of "unavailable", "#,
    ]);
    let e = err(&with("balance", "policy = 'random'"));
    assert!(
        e.ends_with(r#""least-sessions", "rendezvous", "round-robin""#),
        "{e}"
    );
}

#[test]
fn tls_files_must_be_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "x").unwrap();
    std::fs::write(&key, "x").unwrap();
    let tls = |c: &Path, k: &Path, sni: &str| {
        base().replace("http = ", "https = ")
            + &format!(
                "\n[tls]\ncert = {:?}\nkey = {:?}\n{sni}",
                c.display(),
                k.display()
            )
    };
    let ok = parse(&tls(&cert, &key, "")).unwrap();
    assert_eq!(ok.tls.unwrap().cert, cert);
    let missing = dir.path().join("missing.pem");
    let e = err(&tls(&missing, &key, ""));
    assert!(
        e.starts_with("tls.cert: cannot read ") && e.contains("missing.pem"),
        "{e}"
    );
    let e = err(&tls(&cert, &missing, ""));
    assert!(
        e.starts_with("tls.key: ") && e.contains("missing.pem"),
        "{e}"
    );
    let sni = |name: &str, c: &Path| {
        format!(
            "[[tls.sni]]\nname = {name:?}\ncert = {:?}\nkey = {:?}\n",
            c.display(),
            key.display()
        )
    };
    let two = sni("A.example.com", &cert) + &sni("b.example.com", &missing);
    assert!(err(&tls(&cert, &key, &two)).starts_with("tls.sni[1].cert: "));
    let c = parse(&tls(&cert, &key, &sni("A.example.com", &cert))).unwrap();
    assert_eq!(c.tls.unwrap().sni[0].name, "a.example.com");
}

#[test]
fn accepted_spellings() {
    let c = parse(&with(
        "affinity",
        "same_site = \"none\"\nsecure = true\nkey = [\"header:X-Conversation-Id\", \"cookie\"]",
    ))
    .unwrap();
    assert_eq!(
        (c.affinity.same_site, c.affinity.secure),
        (SameSite::None, SecureMode::Always)
    );
    let header = http::HeaderName::from_static("x-conversation-id");
    assert_eq!(
        c.affinity.key,
        vec![KeySource::Header(header), KeySource::Cookie]
    );
    let c = parse(&with(
        "affinity",
        "secure = \"false\"\nidle_timeout = \"2h\"",
    ))
    .unwrap();
    assert_eq!(c.affinity.secure, SecureMode::Never);
    assert_eq!(c.affinity.idle_timeout, Some(Duration::from_secs(7200)));
    // URL-safe base64 without padding: 32 × 0xff.
    let c = parse(&base().replace(KEY, "__________________________________________8")).unwrap();
    assert_eq!(c.affinity.keys[0].bytes(), &[0xff; 32]);
    let extra = "\n[balance]\npolicy = \"rendezvous\"\nkey = \"cookie:uid\"\n\n\
                 [state]\npath = \"/_t/\"\nstore = \"postgres://u@db/x\"\n\n\
                 [limits]\nmax_body_bytes = 1024\n";
    let c = parse(&(base() + extra)).unwrap();
    assert_eq!(c.balance.policy, Policy::Rendezvous);
    assert_eq!(c.balance.key, Some(BalanceKey::Cookie("uid".into())));
    assert_eq!(
        (c.state.path.as_str(), c.limits.max_body_bytes),
        ("/_t", Some(1024))
    );
    let discovered = base().replace(
        BACKEND_A,
        "[discovery]\ndns = \"w.internal\"\nport = 9000\n",
    );
    let c = parse(&discovered).unwrap();
    assert!(c.backends.is_empty());
    let d = c.discovery.unwrap();
    assert_eq!(
        (d.dns.as_str(), d.port, d.interval),
        ("w.internal", 9000, Duration::from_secs(10))
    );
}

#[test]
fn unknown_keys_are_reported_with_their_line() {
    let e = err(&(base() + "\n[limits]\nmax_conections = 5\n"));
    assert!(e.contains("max_conections") && e.contains("line 12"), "{e}");
    let e = err(&(base() + "wieght = 2\n"));
    assert!(e.contains("wieght") && e.contains("line 10"), "{e}");
    let e = err(&(base() + "\n[limit]\n"));
    assert!(e.contains("limit") && e.contains("line 11"), "{e}");
    let e = err(&with("affinity", "secure = 1"));
    assert!(e.contains("line 5") && e.contains("or a boolean"), "{e}");
}

#[test]
fn env_interpolation() {
    set_env("TETHER_TEST_KEY_9B2C", KEY);
    set_env("TETHER_TEST_PORT_9B2C", "9100");
    set_env("TETHER_TEST_TOKEN_9B2C", "s3cret");
    let text = base()
        .replace(KEY, "${TETHER_TEST_KEY_9B2C}")
        .replace("9001", "${TETHER_TEST_PORT_9B2C}")
        + "\n[admin]\ntoken = \"Bearer-${TETHER_TEST_TOKEN_9B2C}-${TETHER_TEST_PORT_9B2C}\"\n";
    let c = parse(&text).unwrap();
    assert_eq!(c.affinity.keys[0].bytes(), &[1u8; 32]);
    assert_eq!(c.backends[0].url, "http://127.0.0.1:9100");
    assert_eq!(c.admin.token.unwrap().expose(), "Bearer-s3cret-9100");

    let e = err(&base().replace(KEY, "${TETHER_TEST_UNSET_7F3A}"));
    assert_eq!(
        e,
        "affinity.keys[0]: environment variable TETHER_TEST_UNSET_7F3A is not set"
    );
    let e =
        err(&(base()
            + "weight = 1\n[[backends]]\nid = \"b\"\nurl = \"${TETHER_TEST_UNSET_7F3A}\"\n"));
    assert!(
        e.starts_with("backends[1].url: environment variable TETHER_TEST_UNSET_7F3A"),
        "{e}"
    );
    assert!(
        err(&with("affinity", "cookie = \"${OPEN\"")).starts_with("affinity.cookie: unterminated")
    );
    assert!(err(&with("affinity", "cookie = \"${}\"")).starts_with("affinity.cookie: "));
}

#[test]
fn secrets_do_not_print() {
    let text =
        base() + "\n[admin]\ntoken = \"hunter2\"\n\n[state]\nstore = \"postgres://u:pw42@db/x\"\n";
    let shown = format!("{:?}", parse(&text).unwrap());
    for secret in ["hunter2", "pw42", KEY, "[1, 1, 1"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("Secret(***)") && shown.contains("KeyMaterial(32 bytes)"));
}

#[test]
fn the_container_config_parses() {
    set_env("TETHER_COOKIE_KEY", KEY);
    set_env("TETHER_WORKERS_DNS", "workers.default.svc");
    set_env("TETHER_STORE", "postgres://tether@db/tether");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/docker.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.listen.http, Some("0.0.0.0:8080".parse().unwrap()));
    assert_eq!(c.listen.admin, "0.0.0.0:9900".parse().unwrap());
    let d = c.discovery.expect("discovery");
    assert_eq!((d.dns.as_str(), d.port), ("workers.default.svc", 8000));
    assert_eq!(c.state.store.expose(), "postgres://tether@db/tether");
}

#[test]
fn the_committed_example_parses() {
    set_env("TETHER_COOKIE_KEY", KEY);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tether.toml");
    let c = Config::load(&path).unwrap();
    let ids: Vec<&str> = c.backends.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["worker-a", "worker-b", "worker-c"]);
    assert_eq!(c.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(c.state.store.expose(), "sqlite://tether.db");
    let missing = Config::load(Path::new("/nonexistent/tether.toml")).unwrap_err();
    assert!(missing
        .to_string()
        .starts_with("cannot read config file /nonexistent/tether.toml"));
}

#[test]
fn trusted_proxies_are_networks_named_by_index() {
    let text = |list: &str| {
        base().replace(
            "http = \"127.0.0.1:8080\"\n",
            &format!("http = \"127.0.0.1:8080\"\ntrusted_proxies = [{list}]\n"),
        )
    };
    let c = parse(&text("\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.1\"")).unwrap();
    let nets: Vec<String> = c
        .listen
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "fd00::/8", "192.0.2.1/32"]);
    let e = err(&text("\"10.0.0.0/8\", \"10.0.0.0/33\""));
    assert!(e.contains("listen.trusted_proxies[1]"), "{e}");
    let e = err(&with("limits", "max_request_line_bytes = 10"));
    assert!(e.contains("limits.max_request_line_bytes"), "{e}");
}

#[test]
fn admission_keys_get_their_defaults_and_bad_values_name_the_key() {
    let c = parse(&base()).unwrap();
    assert_eq!(c.balance.max_inflight, None);
    assert_eq!(c.backends[0].max_inflight, None);
    assert_eq!(c.queue.timeout, Duration::from_secs(30));
    assert_eq!(c.queue.max_waiting, 1000);
    assert!(c.queue.stream_slots);
    assert!(c.rate_limits.is_empty());
    assert_eq!(c.rate_limit.max_keys, 50_000);

    let c = parse(&with("", "max_inflight = 4")).unwrap();
    assert_eq!(c.backends[0].max_inflight, Some(4));
    let rule =
        "[[rate_limits]]\nkey = \"header:X-Api-Key\"\nrate = \"600/m\"\npath_prefix = \"/api\"";
    let c = parse(&format!("{}\n{rule}\n", base())).unwrap();
    let r = &c.rate_limits[0];
    assert_eq!(r.name, "0");
    assert_eq!(
        r.key,
        RateKey::Header(http::HeaderName::from_static("x-api-key"))
    );
    assert_eq!(
        (r.count, r.per, r.burst),
        (600, Duration::from_secs(60), 600)
    );
    assert_eq!(r.path_prefix.as_deref(), Some("/api"));

    assert!(err(&with("", "max_inflight = 0"))
        .starts_with("backends[0].max_inflight: 0 is out of range"));
    assert!(err(&with("balance", "max_inflight = -1")).starts_with("balance.max_inflight:"));
    assert!(err(&with("queue", "timeout = \"0s\"")).starts_with("queue.timeout:"));
    let rules = |body: &str| format!("{}\n[[rate_limits]]\n{body}\n", base());
    assert!(
        err(&rules("key = \"ip\"\nrate = \"10/d\"")).starts_with("rate_limits[0].rate: \"10/d\"")
    );
    assert!(err(&rules("key = \"ip\"\nrate = \"0/s\""))
        .starts_with("rate_limits[0].rate: 0 is out of range"));
    assert!(
        err(&rules("key = \"user\"\nrate = \"1/s\"")).starts_with("rate_limits[0].key: \"user\"")
    );
    assert!(err(&rules("rate = \"1/s\"")).starts_with("rate_limits[0].key: required"));
    assert!(
        err(&rules("key = \"ip\"\nrate = \"1/s\"\nburst = 0")).starts_with("rate_limits[0].burst:")
    );
    assert!(err(&rules("key = \"ip\"\nrate = \"1/s\"\nttl = 1")).contains("unknown field `ttl`"));
}
