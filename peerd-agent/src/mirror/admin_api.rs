//! The admin API on the mirror's listener (`openapi.yaml`): health, readiness and the
//! self-check, `/metrics`, `/status`, the cache listing and removal, preheat. Documents are the
//! serde types of `crate::admin`, shared with the CLI.
use super::*;

/// The store's gauges and the cluster's membership, rendered on `/metrics`.
struct NodeGauges<'a>(&'a Mirror);

impl MetricsSource for NodeGauges<'_> {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        use crate::metrics::{counter, gauge};
        let s = self.0.store().stats();
        gauge(r, "store_used_bytes", "Bytes reserved by cached blobs", s.used_bytes as i64);
        gauge(r, "store_budget_bytes", "Cache budget", s.budget_bytes as i64);
        gauge(r, "store_blobs", "Blobs in the cache, complete or partial", s.blobs as i64);
        gauge(r, "store_complete_blobs", "Complete, verified blobs in the cache", s.complete_blobs as i64);
        r.register("store_evictions", "Blobs evicted to stay within the budget", prometheus_client::metrics::counter::ConstCounter::new(s.evictions));
        if let Some(cl) = self.0.cluster() {
            gauge(r, "members", "Live cluster members known to this node, itself included", cl.peers.members().len() as i64);
        }
        counter(r, "peer_addrs_ignored", "Peer addresses from gossip that cannot be dialled from here (wildcard, port 0, foreign loopback), ignored", &crate::peers::IGNORED_PEER_ADDRS);
    }
}

impl Mirror {
    /// Records how this node was set up; returns the self-check's warnings (also in status).
    pub fn set_node_info(&self, info: NodeInfo) -> Vec<String> {
        let _ = self.inner.node.set(info);
        self.self_check().1
    }

    /// What each registry gets from this node, and warnings about a setup that cannot be
    /// useful: (per registry: name, url, "cached" or "relayed", why), warnings.
    fn self_check(&self) -> (Vec<admin::RegistryCheck>, Vec<String>) {
        let node = self.inner.node.get().cloned().unwrap_or_default();
        let mut regs: Vec<_> = self
            .inner
            .cfg
            .registries
            .iter()
            .map(|r| {
                let https = r.url.scheme() == "https";
                let hosts_toml = node.hosts_toml_dir.as_ref().map(|dir| dir.join(&r.name).join("hosts.toml"));
                let via_hosts_toml = hosts_toml.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).is_some_and(|t| {
                    t.contains(&format!("127.0.0.1:{}", node.mirror_port)) || t.contains(&format!("localhost:{}", node.mirror_port))
                });
                if via_hosts_toml {
                    let f = hosts_toml.map(|f| f.display().to_string()).unwrap_or_default();
                    return admin::RegistryCheck { name: r.name.clone(), url: r.url.to_string(), pulls: "cached".into(), why: format!("containerd's {f} names this mirror (the registry is its fallback)") };
                }
                let (state, why) = match (node.mode.as_str(), https, node.tls_intercept) {
                    ("transparent", false, _) => ("cached", "plain HTTP: redirected connections are served by the mirror".to_string()),
                    ("transparent", true, true) => ("cached", "HTTPS terminated with the intercept CA: cached when the node trusts it, else the pull fails TLS".to_string()),
                    ("transparent", true, false) => ("relayed", "HTTPS without --tls-intercept: redirected connections are relayed untouched, not cached (use hosts.toml for this registry, or --tls-intercept)".to_string()),
                    _ => ("cached", "for clients pointed at this mirror (containerd hosts.toml with ns=, or the Host header)".to_string()),
                };
                admin::RegistryCheck { name: r.name.clone(), url: r.url.to_string(), pulls: state.to_string(), why }
            })
            .collect();
        regs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut warn = Vec::new();
        if let Some(a) = node.advertised {
            if a.ip().is_unspecified() {
                warn.push(format!("advertising the wildcard address {a}: peers cannot reach this node (set --advertise-addr)"));
            }
            let remote_seeds = !node.seeds.is_empty() || node.static_peers > 0;
            if a.ip().is_loopback() && remote_seeds && node.advertised_how == crate::identity::Chosen::Loopback.to_string() {
                warn.push(format!("advertising loopback {a} ({}): nodes on other hosts cannot reach it (set --advertise-addr)", node.advertised_how));
            }
            if !node.seeds.is_empty() && node.seeds_resolved == 0 {
                warn.push(format!("no seed resolved at start ({}): gossip keeps trying", node.seeds.join(", ")));
            }
        }
        if regs.iter().all(|r| r.pulls == "relayed") && !regs.is_empty() {
            warn.push("no registry is cached: every pull is relayed to the registry (see registries in `peerd status`)".into());
        }
        (regs, warn)
    }

    /// `/metrics`: the mirror's counters, this node's gauges and every added source.
    pub(super) fn metrics_text(&self) -> String {
        let added = self.metrics_sources();
        let node = NodeGauges(self);
        let mut all: Vec<&dyn MetricsSource> = vec![self.counters(), &node, &self.inner.fetch, &self.inner.upstream];
        all.extend(added.iter().map(|s| s.as_ref() as &dyn MetricsSource));
        crate::metrics::render(&all)
    }

    /// The admin API (openapi.yaml): cache listing and removal. Changes are accepted only from
    /// this node (loopback), since the mirror port may be reachable from the network.
    pub(super) async fn admin(&self, req: &Request<()>, path: &str, peer: SocketAddr) -> Option<Resp> {
        if path == "/preheat" {
            if *req.method() != Method::POST {
                return Some(error(405, "UNSUPPORTED", "POST /preheat?image=registry/name:tag"));
            }
            if !peer.ip().is_loopback() {
                return Some(error(403, "DENIED", "preheat is accepted from this node only"));
            }
            let image = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("image="))).map(percent_decode);
            return Some(match image {
                Some(i) => self.preheat(&i),
                None => error(400, "IMAGE_INVALID", "missing ?image=registry/name:tag"),
            });
        }
        let rest = path.strip_prefix("/cache")?;
        let m = req.method();
        // The listing names every cached digest: what an attacker needs to ask for someone
        // else's blob. This node only, like every admin call.
        if !peer.ip().is_loopback() {
            return Some(error(403, "DENIED", "the admin API answers this node (loopback) only"));
        }
        if rest.is_empty() || rest == "/" {
            if *m != Method::GET {
                return Some(error(405, "UNSUPPORTED", "GET /cache lists the cache"));
            }
            let items: Vec<admin::CacheEntry> = self
                .inner
                .store
                .list()
                .into_iter()
                .map(|b| admin::CacheEntry { digest: b.digest.to_string(), size: b.size, complete: b.complete, pieces_present: b.pieces_present, pieces_total: b.pieces_total })
                .collect();
            return Some(json_response(200, &items));
        }
        let digest = rest.strip_prefix('/')?;
        if *m != Method::DELETE {
            return Some(error(405, "UNSUPPORTED", "DELETE /cache/<digest> removes a blob"));
        }
        if !peer.ip().is_loopback() {
            return Some(error(403, "DENIED", "cache changes are accepted from this node only"));
        }
        let d: Digest = match digest.parse() {
            Ok(d) => d,
            Err(e) => return Some(error(400, "DIGEST_INVALID", &e.to_string())),
        };
        Some(match self.inner.store.remove(&d).await {
            Ok(true) => {
                let _ = std::fs::remove_file(self.inner.media_dir.join(d.hex()));
                let mut r = Response::new(Body::Empty);
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Ok(false) | Err(crate::store::StoreError::NotFound(_)) => error(404, "BLOB_UNKNOWN", &format!("{d} is not cached")),
            Err(crate::store::StoreError::Pinned(_)) => error(409, "BUSY", &format!("{d} is being read or written; try again")),
            Err(e) => error(500, "INTERNAL", &e.to_string()),
        })
    }

    /// Fetches every blob of an image into the cluster (through the normal miss path: peers, the
    /// rendezvous owner, upstream), streaming one JSON line of progress per blob and a last line
    /// `{"done":true,...}` or `{"error":...}`.
    fn preheat(&self, image: &str) -> Resp {
        let Some((registry, name, reference)) = parse_image(image) else {
            return error(400, "IMAGE_INVALID", "image must be registry/name:tag or registry/name@digest");
        };
        let Some(reg) = self.inner.cfg.registries.resolve(Some(&registry), None).cloned() else {
            return error(404, "NAME_UNKNOWN", &format!("unknown registry {registry}; configure it with --registry NAME=URL"));
        };
        if !oci::valid_name(&name) {
            return error(400, "NAME_INVALID", &format!("invalid repository name {name:?}"));
        }
        let (tx, body) = Body::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let line = |l: admin::PreheatLine| Ok(Bytes::from(serde_json::to_string(&l).unwrap_or_default() + "\n"));
            let result: Result<(usize, u64), String> = async {
                let mut accept = HeaderMap::new();
                accept.insert(header::ACCEPT, header::HeaderValue::from_static(MANIFEST_TYPES));
                let mut refs = vec![reference];
                let mut blobs: Vec<(Digest, u64)> = Vec::new();
                while let Some(r) = refs.pop() {
                    let parsed = oci::parse_reference(&r).map_err(|e| e.message)?;
                    let resp = this.manifest(false, &reg, &name, parsed, &accept).await;
                    let status = resp.status();
                    let bytes = collect(resp.into_body()).await.map_err(|e| e.to_string())?;
                    if status != StatusCode::OK {
                        return Err(format!("manifest {r}: {status}: {}", String::from_utf8_lossy(&bytes)));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("manifest {r}: {e}"))?;
                    for m in v["manifests"].as_array().into_iter().flatten() {
                        if let Some(d) = m["digest"].as_str() {
                            refs.push(d.to_string());
                        }
                    }
                    for b in std::iter::once(&v["config"]).chain(v["layers"].as_array().into_iter().flatten()) {
                        if let (Some(Ok(d)), Some(size)) = (b["digest"].as_str().map(str::parse::<Digest>), b["size"].as_u64()) {
                            if !blobs.iter().any(|(x, _)| *x == d) {
                                blobs.push((d, size));
                            }
                        }
                    }
                }
                let total: u64 = blobs.iter().map(|b| b.1).sum();
                let mut done = 0u64;
                for (i, (d, size)) in blobs.iter().enumerate() {
                    let resp = this.blob(false, &reg, &name, *d, &HeaderMap::new()).await;
                    let status = resp.status();
                    let bytes = collect(resp.into_body()).await.map_err(|e| format!("blob {d}: {e}"))?;
                    if status != StatusCode::OK {
                        return Err(format!("blob {d}: {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)])));
                    }
                    done += size;
                    let _ = tx.send(line(admin::PreheatLine::Blob { blob: d.to_string(), index: i + 1, blobs: blobs.len(), done_bytes: done, total_bytes: total })).await;
                }
                Ok((blobs.len(), total))
            }
            .await;
            let last = match result {
                Ok((n, total)) => admin::PreheatLine::Done { done: true, blobs: n, total_bytes: total },
                Err(e) => admin::PreheatLine::Error { error: e },
            };
            let _ = tx.send(line(last)).await;
        });
        let mut r = Response::new(body);
        set(r.headers_mut(), header::CONTENT_TYPE, "application/x-ndjson");
        r
    }

    /// What `peerd status` prints: this node, its cache, its peers, the self-check.
    pub(super) fn status(&self) -> admin::Status {
        let s = self.inner.store.stats();
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (mut me, mut peers) = (String::new(), Vec::new());
        if let Some(cl) = self.inner.fetch.cluster() {
            me = cl.peers.me().to_string();
            peers = cl
                .peers
                .describe()
                .into_iter()
                .map(|p| admin::Peer { id: p.id, addr: p.addr, zone: p.zone, state: p.state, last_seen_ms: p.last_seen_ms, advertised: p.advertised.map(|(complete, partial)| admin::Advertised { complete, partial }) })
                .collect();
        }
        let in_progress = self
            .inner
            .store
            .list()
            .into_iter()
            .filter(|b| !b.complete)
            .map(|b| admin::InProgress { digest: b.digest.to_string(), size: b.size, pieces_present: b.pieces_present, pieces_total: b.pieces_total })
            .collect();
        let (from_peers, to_peers) = self.inner.fetch.cluster().map_or((0, 0), |cl| {
            let t = cl.transfer.counters();
            (load(&t.bytes_from_peers), load(&t.bytes_to_peers))
        });
        let peer_data = self.inner.fetch.cluster().map_or_else(admin::PeerData::default, |cl| {
            let (transport, listening, bulk_requests, fallbacks) = cl.transfer.peer_data();
            admin::PeerData { transport: transport.into(), listening, bulk_requests, fallbacks }
        });
        let node = self.inner.node.get().cloned().unwrap_or_default();
        let (registries, warnings) = self.self_check();
        let my_id = node.node_id.clone();
        let mut warnings = warnings;
        if !my_id.is_empty() && peers.iter().any(|p: &admin::Peer| p.id == my_id) {
            warnings.push(format!("another member uses this node's id {my_id:?} (a copied data dir?): delete <data-dir>/node-id on one of them"));
        }
        let peers_alive = peers.iter().filter(|p| p.state == "alive" || p.state == "configured").count();
        admin::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            self_check: admin::SelfCheck {
                node_id: node.node_id,
                hostname: node.hostname,
                mode: node.mode,
                advertised: node.advertised.map(|a| a.to_string()).unwrap_or_default(),
                advertised_from: node.advertised_how,
                seeds: node.seeds,
                seeds_resolved: node.seeds_resolved,
                peers_alive,
                registries,
                warnings,
            },
            peer_addr: me,
            cache: admin::CacheStats { used_bytes: s.used_bytes, budget_bytes: s.budget_bytes, blobs: s.blobs, complete_blobs: s.complete_blobs, evictions: s.evictions },
            requests: admin::Requests { hits: load(&c.hits), peer_hits: load(&c.hits_from_peers), misses: load(&c.misses) },
            bytes: admin::ByteCounts { from_upstream: load(&self.inner.upstream.counters().bytes), from_peers, to_peers, to_clients_from_cache: load(&c.bytes_from_cache) },
            in_progress,
            peers,
            peer_data,
        }
    }
}
