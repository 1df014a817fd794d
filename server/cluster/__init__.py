"""loraswap on Ray Serve: N replicas, each a whole `loraswap serve` (the base, the engine, the store or the registry's
cache), behind one HTTP endpoint that routes a request for an adapter to a replica already holding it.

- `proxy.py`: the ingress deployment. It reads which adapter a request names and sends the request to the replicas
  with that name as Ray Serve's multiplexed model id, so Serve's router prefers a replica that holds it.
- `replica.py`: the replica deployment. It runs `loraswap serve` as a child process on the loopback address and
  forwards each request to it; Serve's per-replica model LRU is mirrored by `Hold`s, which never free anything
  under a running request (the engine's refcounting LRU decides what stays loaded).
- `directory.py`: where replicas report their Prometheus metrics, merged with a `replica` label for `/metrics`.
- `child.py`: the child process's entry point (it stops when its replica is gone).
- `app.py`: the application's deployments and options, and `loraswap serve --ray`.
"""
