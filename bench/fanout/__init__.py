"""Fan-out benchmark: `shoal serve` and N simulated Envoy sidecars over real ADS.

Writes a manifests folder of `--services` Services (namespace `default`, one
EndpointSlice file each, 3 endpoints), starts `shoal serve` on it as a separate
process and connects N proxies from worker processes: grpc.aio clients, one
channel (one TCP connection) per stream as real Envoys have, each a sidecar
with its own node metadata (its own OUTBOUND_PORT, so its own snapshot key).
By default xDS is mTLS, as `shoal serve` runs: every proxy presents a client
certificate from the mesh CA (all are default/default). The proxies speak ADS
as Envoy does, delta (DeltaAggregatedResources) or state of the world
(StreamAggregatedResources): CDS and LDS wildcard; on CDS, ACK and subscribe
EDS to the outbound clusters (and, with mTLS, SDS to the two secrets); on LDS,
subscribe RDS to "outbound"; ACK every response. They read only a response's
type, version, nonce and resource names. For each N it measures:

* connect_all_s: from the start of connecting until every proxy has ACKed
  CDS, EDS, LDS and RDS (and SDS);
* push latency: one EndpointSlice file is rewritten with a new address (the
  clock starts just before the write) until each proxy has ACKed the EDS
  update; p50 and p99 over proxies, median over `--pushes` pushes. This
  includes the file watcher, the registry reload, the 100 ms debounce quiet
  period and the rebuild; push_p99_ms_excl_debounce subtracts the 100 ms;
* the server's RSS per idle stream, its CPU seconds per push, and a reconnect
  storm (every proxy drops its stream and reconnects at once, without
  versions, so every proxy is sent its full configuration again);
* the floor: a bare grpc.aio server (floor.py, started as `bench/fanout.py
  --floor-server`, with the same gRPC options and TLS) that holds N streams
  and, on SIGUSR1, writes one pre-serialized response (the bytes a proxy
  received for shoal's push) to every stream; the same clients ACK it.

`--instrument` runs `shoal serve` in a wrapper (instrumented_serve.py; shoal
is not changed) that times its garbage collections, registry reloads,
rebuilds and writes, and splits each push into watcher, reload, debounce,
rebuild and fan-out; `--server-profile FILE` cProfiles one phase. Every figure assumes nothing
else runs on the machine: `other_cpu_s` says how much did.

    .venv/bin/python bench/fanout.py [--proxies 100,1000,2000] [--mode delta|sotw]
                                     [--services N] [--json]

The modules, by responsibility:

  command.py             the command line; the coordinator, or a process it starts
  run.py                 one run per proxy count: shoal serve, then the floor
  harness.py             the server under test, and the mesh CA's certificates
  instrumented_serve.py  shoal serve with a look inside (--instrument, --tracemalloc,
                         --server-profile), a script of its own
  clients.py             the client fleet: simulated sidecars in worker processes
  floor.py               the floor server
  mesh.py                the manifests folder and the proxies' nodes
  wire.py                ADS requests and responses as the clients read them
  figures.py             what is measured, and how pushes are summed up
  report.py              the table and the JSON output
  processes.py           child processes, stopped whatever happens; /proc readings
"""
