"""What an adapter is: its base and fingerprint, prompt format, files, manifest, validation and store."""
