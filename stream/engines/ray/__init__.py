"""Models on Ray Serve (`--inference ray`): the front-end keeps sessions, protocol and state; the
models run as Serve deployments on a Ray cluster, each scaled on its own.

    front-end (no Ray in its process)                         Ray cluster
    AnalysisEngine --RemoteAnalyser--pipe--> bridge process --handle--> wav2vec2-analysis
                                             (a Ray driver)               (@serve.batch: windows
                                                                           of every front-end)
    GenerationEngine --pipe--> generation worker process --handle, stream--> audioldm-generation
                               (a Ray driver: RayGenerator)                  (blocks as made)

Why the Ray calls leave the front-end's process: a Ray driver is bound to the cluster it joined.
When that cluster goes away, the driver can never reach a new one (it hangs, and Ray ends the
process after a minute), so the front-end would have to restart with every session on it.
Here the drivers are child processes that exit when the cluster's GCS stops answering
(`cluster.watch`), and the front-end starts them again, with backoff, until the cluster is
back: meanwhile /readyz says 503 and sessions get typed errors. Ray's threads, memory and log
output stay out of the front-end too, and the default install never imports Ray.

Modules: `wire` (what crosses the pipe and the cluster: plain data), `cluster` (joining a
cluster, finding or deploying the applications, watching the GCS), `deployments` (the Serve
deployments and the application builders that `serve deploy` names), `bridge` (the analysis
driver process), `analyser` (the front-end's side of it), `generator` (the generation worker's
loader for Ray).
"""
