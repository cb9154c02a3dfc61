"""PKI tooling: the dev CA and certificates (`hybridroute certs init`), and loading
TLS credentials for servers and clients, with rotation picked up without a restart."""
