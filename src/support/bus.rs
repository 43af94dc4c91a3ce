//! Which D-Bus to connect to: `system`, `session`, or an address. Shared by
//! the D-Bus door, the CLI and the OTA coordinator's RAUC client, none of
//! which may import another.

use zbus::connection::Builder;

/// Which bus: `system`, `session`, or an address.
pub fn builder(bus: &str) -> zbus::Result<Builder<'static>> {
    match bus {
        "system" => Builder::system(),
        "session" => Builder::session(),
        address => Builder::address(address),
    }
}
