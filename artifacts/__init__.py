"""artifacts: the versioned artifact store (local directory or S3), manifests, leases, run index."""
