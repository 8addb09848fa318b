//! The framework's floor, for `make bench`: Pingora's own proxy (`ProxyHttp`), doing nothing
//! but forward to one upstream. `aoai-gateway` serves HTTP/1.x on its own codec because this
//! alone measured well below a bare nginx (load-tests/results.md).
//! Usage: bare_pingora [LISTEN] [UPSTREAM]
use async_trait::async_trait;
use pingora::prelude::*;
use std::net::SocketAddr;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare(SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        let mut p = HttpPeer::new(self.0, false, String::new());
        p.options.tcp_keepalive = None;
        Ok(Box::new(p))
    }
}

fn main() {
    let listen = std::env::args().nth(1).unwrap_or("127.0.0.1:18093".into());
    let upstream: SocketAddr = std::env::args()
        .nth(2)
        .unwrap_or("127.0.0.1:18080".into())
        .parse()
        .unwrap();
    let conf = pingora::server::configuration::ServerConf {
        threads: 1,
        work_stealing: false,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Bare(upstream));
    let mut opts = pingora::listeners::TcpSocketOptions::default();
    opts.tcp_fastopen = None;
    svc.add_tcp_with_settings(&listen, opts);
    server.add_service(svc);
    server.run_forever();
}
