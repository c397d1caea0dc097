//! [`OpcUaServer`]: an in-process OPC UA server (async-opcua) with a few machine variables in
//! its own namespace, endpoints `None` and `Basic256Sha256`/`SignAndEncrypt`.
//!
//! Address space: folder `Machine1` with `Machine1.Temp` (Double, the `temp` given at start so a
//! restarted server is recognisable), `Machine1.Speed` (Int32 1500), `Machine1.Running`
//! (Boolean true), `Machine1.Count` (UInt64 7), `Machine1.Name` (String "press 1"); node ids
//! `ns=2;s=Machine1.<name>`. Client certificates are trusted only when placed in
//! `<pki_dir>/trusted/` (`trust_client_certs(false)`). [`OpcUaServer::stop`] waits until the
//! listener is closed; dropping without `stop` cancels the server too.

use std::{path::Path, sync::Arc, time::Duration};

use opcua::{
    crypto::SecurityPolicy,
    server::{
        ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerHandle,
        address_space::Variable,
        diagnostics::NamespaceMetadata,
        node_manager::memory::{SimpleNodeManager, simple_node_manager},
    },
    types::{DataValue, MessageSecurityMode, NodeId, UAString, Variant},
};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

/// The namespace URI of the test variables.
pub const NS_URI: &str = "urn:kip:test:machines";

/// The user-token id of the username/password user on the secure endpoint.
pub const USER_TOKEN_ID: &str = "kip-user";
/// The user-token id of the optional X.509 user ([`OpcUaServer::start_with_x509_user`]).
pub const X509_TOKEN_ID: &str = "kip-x509";
/// The username the secure endpoint accepts.
pub const TEST_USER: &str = "kip";
/// [`TEST_USER`]'s password.
pub const TEST_PASSWORD: &str = "s3cret-pw";

/// How long [`OpcUaServer::stop`] waits for the server to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running in-process OPC UA server.
pub struct OpcUaServer {
    handle: ServerHandle,
    nm: Arc<SimpleNodeManager>,
    ns: u16,
    tracker: TaskTracker,
}

impl std::fmt::Debug for OpcUaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpcUaServer")
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

impl OpcUaServer {
    /// Starts the server on `listener` (bind `127.0.0.1:0`), with its PKI in `pki_dir`
    /// (a sample RSA key pair is created there).
    pub async fn start(listener: TcpListener, pki_dir: &Path, temp: f64) -> Self {
        Self::start_with_x509_user(listener, pki_dir, temp, None).await
    }

    /// [`Self::start`], also accepting the X.509 user certificate (DER file) `x509_user` on
    /// the `Basic256Sha256` endpoint. That endpoint always accepts anonymous users and the
    /// user [`TEST_USER`] with password [`TEST_PASSWORD`] (token id [`USER_TOKEN_ID`]).
    pub async fn start_with_x509_user(
        listener: TcpListener,
        pki_dir: &Path,
        temp: f64,
        x509_user: Option<&Path>,
    ) -> Self {
        let port = listener.local_addr().unwrap().port();
        let tokens: &[&str] = &[ANONYMOUS_USER_TOKEN_ID];
        let secure_tokens: &[&str] = if x509_user.is_some() {
            &[ANONYMOUS_USER_TOKEN_ID, USER_TOKEN_ID, X509_TOKEN_ID]
        } else {
            &[ANONYMOUS_USER_TOKEN_ID, USER_TOKEN_ID]
        };
        let mut builder = ServerBuilder::new().add_user_token(
            USER_TOKEN_ID,
            opcua::server::ServerUserToken::user_pass(TEST_USER, TEST_PASSWORD),
        );
        if let Some(cert) = x509_user {
            builder = builder.add_user_token(
                X509_TOKEN_ID,
                opcua::server::ServerUserToken::x509("kip-x509", cert),
            );
        }
        let (server, handle) = builder
            .application_name("kip test server")
            .application_uri("urn:kip:test:server")
            .product_uri("urn:kip:test:server")
            .create_sample_keypair(true)
            .pki_dir(pki_dir)
            .host("127.0.0.1")
            .port(port)
            .discovery_urls(vec![format!("opc.tcp://127.0.0.1:{port}/")])
            .trust_client_certs(false)
            .add_endpoint(
                "none",
                ("/", SecurityPolicy::None, MessageSecurityMode::None, tokens),
            )
            .add_endpoint(
                "basic256sha256",
                (
                    "/",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::SignAndEncrypt,
                    secure_tokens,
                ),
            )
            .with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: NS_URI.into(),
                    ..Default::default()
                },
                "kip-test",
            ))
            .build()
            .unwrap();
        let nm = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .unwrap();
        let ns = handle.get_namespace_index(NS_URI).unwrap();
        {
            let mut space = nm.address_space().write();
            let folder = NodeId::new(ns, "Machine1");
            space.add_folder(
                &folder,
                "Machine1",
                "Machine1",
                &NodeId::objects_folder_id(),
            );
            let var = |name: &str, v: Variant| {
                Variable::new(&NodeId::new(ns, format!("Machine1.{name}")), name, name, v)
            };
            space.add_variables(
                vec![
                    var("Temp", Variant::Double(temp)),
                    var("Speed", Variant::Int32(1500)),
                    var("Running", Variant::Boolean(true)),
                    var("Count", Variant::UInt64(7)),
                    var("Name", Variant::String(UAString::from("press 1"))),
                ],
                &folder,
            );
        }
        let tracker = TaskTracker::new();
        tracker.spawn(server.run_with(listener));
        tracker.close();
        Self {
            handle,
            nm,
            ns,
            tracker,
        }
    }

    /// The namespace index of the test variables.
    pub fn namespace(&self) -> u16 {
        self.ns
    }

    /// Adds `n` Double variables `Machine1.Bulk{i}` with value `i`.
    pub fn add_bulk(&self, n: usize) {
        let mut space = self.nm.address_space().write();
        let vars = (0..n)
            .map(|i| {
                let name = format!("Bulk{i}");
                let id = NodeId::new(self.ns, format!("Machine1.{name}"));
                Variable::new(&id, name.as_str(), name.as_str(), Variant::Double(i as f64))
            })
            .collect();
        space.add_variables(vars, &NodeId::new(self.ns, "Machine1"));
    }

    /// Sets `Machine1.<name>` to `value`, timestamped now.
    pub fn set(&self, name: &str, value: Variant) {
        self.set_dv(name, DataValue::new_now(value));
    }

    /// Sets `Machine1.<name>` to a full data value (status, source time).
    pub fn set_dv(&self, name: &str, dv: DataValue) {
        self.nm
            .set_value(
                self.handle.subscriptions(),
                &NodeId::new(self.ns, format!("Machine1.{name}")),
                None,
                dv,
            )
            .unwrap();
    }

    /// Stops the server and waits until its listener is closed.
    pub async fn stop(self) {
        self.handle.cancel();
        tokio::time::timeout(STOP_TIMEOUT, self.tracker.wait())
            .await
            .expect("OPC UA server did not stop");
    }
}

impl Drop for OpcUaServer {
    fn drop(&mut self) {
        self.handle.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_listens_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = OpcUaServer::start(listener, dir.path(), 21.5).await;
        server.set("Temp", Variant::Double(22.0));
        server.add_bulk(3);
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        server.stop().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
