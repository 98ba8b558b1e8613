"""The management API: `kvmpy serve` (Firecracker's REST API over a Unix socket, with kvmpy's
extensions, an OpenAPI document and a dashboard), one VMM process per VM (docs/api.md)."""
