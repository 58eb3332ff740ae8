//! The turn checker: one simulated user of the reference worker's chat,
//! holding the turns tether acknowledged (a 2xx) and checking every later
//! 2xx against them. A 2xx that misses an acknowledged turn is a
//! violation, unless tether says so openly with `Tether-Restore`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// Longest wait for one turn (the client's own timeout is longer).
pub const TURN_TIMEOUT: Duration = Duration::from_secs(10);

/// A 2xx that silently lost acknowledged turns.
#[derive(Debug, Clone)]
pub struct Violation {
    pub user: String,
    pub message: String,
    pub worker: String,
    /// Acknowledged turns the answer's history lacks (or has out of order).
    pub missing: Vec<String>,
    /// The user messages the answer's history holds.
    pub shown: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: turn {:?} answered 2xx by {:?} without {} acknowledged turn(s) {}; the answer held {} user turn(s): {}",
            self.user,
            self.message,
            self.worker,
            self.missing.len(),
            brief(&self.missing),
            self.shown.len(),
            brief(&self.shown),
        )
    }
}

/// A long list shown by its ends.
fn brief(list: &[String]) -> String {
    match list {
        [] => "[]".into(),
        [one] => format!("[{one}]"),
        [first, second] => format!("[{first}, {second}]"),
        [first, .., last] => format!("[{first} … {last}]"),
    }
}

/// What one turn got.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A 2xx: the worker, the whole history, `Tether-Restore` if present.
    Ok {
        worker: String,
        history: Vec<Value>,
        restore: Option<String>,
    },
    /// Any other status.
    Status(u16),
    /// No answer (connection error or timeout).
    Error(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}

/// One user: a cookie jar and the turns acknowledged so far.
pub struct Chat {
    pub name: String,
    pub client: reqwest::Client,
    /// User messages acknowledged with a 2xx, in order.
    pub acked: Vec<String>,
    /// The session id (hex) the worker echoed.
    pub session: Option<String>,
    /// The worker of the last 2xx.
    pub worker: Option<String>,
    pub violations: Vec<Violation>,
    /// 2xx answers without `Tether-Restore`.
    pub ok: usize,
    /// `Tether-Restore` values seen on 2xx answers.
    pub restore: BTreeMap<String, usize>,
    /// Other answers by status (or "error" / "timeout").
    pub refused: BTreeMap<String, usize>,
    /// Longest wait for one turn.
    pub timeout: Duration,
    turns: usize,
}

impl Chat {
    pub fn new(name: &str) -> Chat {
        Chat {
            name: name.to_owned(),
            client: super::user(),
            acked: Vec::new(),
            session: None,
            worker: None,
            violations: Vec::new(),
            ok: 0,
            restore: BTreeMap::new(),
            refused: BTreeMap::new(),
            timeout: TURN_TIMEOUT,
            turns: 0,
        }
    }

    /// A fresh, unique message text for this user.
    pub fn next_message(&mut self) -> String {
        self.turns += 1;
        format!("{}-t{}", self.name, self.turns)
    }

    /// Sends one turn and checks the answer.
    pub async fn turn(&mut self, base: &str, msg: &str) -> Outcome {
        let send = async {
            let resp = self
                .client
                .post(format!("{base}/chat?thread=main&message={msg}"))
                .send()
                .await?;
            let status = resp.status();
            let restore = resp
                .headers()
                .get("tether-restore")
                .map(|v| v.to_str().unwrap_or("?").to_owned());
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, restore, body))
        };
        let (status, restore, body) = match tokio::time::timeout(self.timeout, send).await {
            Err(_) => return self.no_answer("timeout", "no answer within the turn timeout".into()),
            Ok(Err(e)) if e.is_timeout() => return self.no_answer("timeout", chain(&e)),
            Ok(Err(e)) => return self.no_answer("error", chain(&e)),
            Ok(Ok(r)) => r,
        };
        if !status.is_success() {
            *self.refused.entry(status.as_u16().to_string()).or_default() += 1;
            return Outcome::Status(status.as_u16());
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let history = v["history"].as_array().cloned().unwrap_or_default();
        let worker = v["worker"].as_str().unwrap_or("?").to_owned();
        if let Some(s) = v["session"].as_str() {
            self.session = Some(s.to_owned());
        }
        self.worker = Some(worker.clone());
        let shown = user_texts(&history);
        if let Some(value) = &restore {
            // tether tells the client openly: start again from what it shows.
            *self.restore.entry(value.clone()).or_default() += 1;
            self.acked = shown;
        } else {
            self.ok += 1;
            let missing = self.missing(&shown, msg);
            if !missing.is_empty() {
                self.violations.push(Violation {
                    user: self.name.clone(),
                    message: msg.to_owned(),
                    worker: worker.clone(),
                    missing,
                    shown: shown.clone(),
                });
                // Report each loss once: go on from what the answer shows.
                self.acked = shown;
            } else {
                self.acked.push(msg.to_owned());
            }
        }
        Outcome::Ok {
            worker,
            history,
            restore,
        }
    }

    /// Sends fresh turns until one gets a 2xx (bounded by `within`),
    /// pausing `pause` after every other answer.
    pub async fn until_ok(
        &mut self,
        base: &str,
        within: Duration,
        pause: Duration,
    ) -> Option<Outcome> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let msg = self.next_message();
            let out = self.turn(base, &msg).await;
            if out.is_ok() {
                return Some(out);
            }
            tokio::time::sleep(pause).await;
        }
        None
    }

    /// Which acknowledged turns `shown` (the user messages of an answer to
    /// `msg`) lacks: they must all be there in order, then `msg` last.
    fn missing(&self, shown: &[String], msg: &str) -> Vec<String> {
        let (last, before) = match shown.split_last() {
            Some((last, before)) => (Some(last.as_str()), before),
            None => (None, shown),
        };
        let mut missing = self.lacks(before);
        if last != Some(msg) {
            missing.push(format!("{msg} (as the last user entry)"));
        }
        missing
    }

    /// The acknowledged turns `shown` does not hold in order.
    pub fn lacks(&self, shown: &[String]) -> Vec<String> {
        let mut missing = Vec::new();
        let mut from = 0;
        for want in &self.acked {
            match shown[from..].iter().position(|s| s == want) {
                Some(i) => from += i + 1,
                None => missing.push(want.clone()),
            }
        }
        missing
    }

    /// The thread as tether serves it now (`GET /chat?thread=main`):
    /// (worker, history).
    pub async fn read(&self, base: &str) -> Result<(String, Vec<Value>), String> {
        let get = self
            .client
            .get(format!("{base}/chat?thread=main"))
            .timeout(self.timeout)
            .send();
        let resp = get.await.map_err(|e| chain(&e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("GET /chat: {status}"));
        }
        let v: Value = resp.json().await.map_err(|e| chain(&e))?;
        let worker = v["worker"].as_str().unwrap_or("?").to_owned();
        Ok((worker, v["history"].as_array().cloned().unwrap_or_default()))
    }

    fn no_answer(&mut self, kind: &str, detail: String) -> Outcome {
        *self.refused.entry(kind.to_owned()).or_default() += 1;
        Outcome::Error(detail)
    }

    /// One line of counts for the report.
    pub fn summary(&self) -> String {
        format!(
            "{}: 2xx {} restore {:?} refused {:?} acked {} on {:?}",
            self.name,
            self.ok,
            self.restore,
            self.refused,
            self.acked.len(),
            self.worker
        )
    }
}

/// The texts of the `"role": "user"` entries of a history.
pub fn user_texts(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .filter(|e| e["role"] == "user")
        .map(|e| e["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The counts and violations of many users, for a final assertion.
pub fn report(users: &[&Chat]) -> (Vec<Violation>, String) {
    let mut all = Vec::new();
    let mut text = String::new();
    let (mut ok, mut restore, mut refused) = (0, BTreeMap::new(), BTreeMap::new());
    for u in users {
        all.extend(u.violations.iter().cloned());
        ok += u.ok;
        for (k, v) in &u.restore {
            *restore.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &u.refused {
            *refused.entry(k.clone()).or_insert(0) += v;
        }
        text.push_str(&u.summary());
        text.push('\n');
    }
    text.push_str(&format!(
        "total: 2xx {ok}, Tether-Restore {restore:?}, non-2xx {refused:?}, violations {}\n",
        all.len()
    ));
    for v in &all {
        text.push_str(&format!("  violation: {v}\n"));
    }
    (all, text)
}

/// An error and its sources on one line.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
