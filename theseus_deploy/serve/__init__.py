"""Serving: a Triton model repository (`export --format triton`), `serve` on PyTriton's bundled
Triton server, and a loopback load generator (`loadtest`). Depends on theseus_deploy.export."""
