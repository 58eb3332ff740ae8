//! `tether demo`: three reference workers (separate processes, so one can
//! be killed) and the proxy in front of them, all on loopback, with the
//! SQLite store in a data directory.

use std::net::SocketAddr;

/// The config text `tether demo` runs with.
pub fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    workers: &[(String, SocketAddr)],
    key_b64: &str,
    store: &str,
) -> String {
    let mut s = format!(
        "[listen]\nhttp = \"{listen}\"\nadmin = \"{admin}\"\n\n\
         [affinity]\nkeys = [\"{key_b64}\"]\n\n\
         [health]\ninterval = \"1s\"\nfall = 2\nrise = 2\n\n\
         [state]\nstore = \"{store}\"\ncapture = \"sync\"\n"
    );
    for (id, addr) in workers {
        s.push_str(&format!(
            "\n[[backends]]\nid = \"{id}\"\nurl = \"http://{addr}\"\n"
        ));
    }
    s
}
