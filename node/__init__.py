"""The on-prem model node: model repository, safe loading, dynamic batching and the
Open Inference Protocol servicer over mutual TLS."""
