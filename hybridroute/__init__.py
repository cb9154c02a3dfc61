"""hybridroute: a policy-driven gRPC inference router for hybrid on-prem/cloud deployments.

Subpackages (each a top-level folder of the repository):

- `hybridroute.protos`: the Open Inference Protocol stubs and tensor conversion
- `hybridroute.certs`: dev PKI and TLS credentials
- `hybridroute.node`: the on-prem model node
- `hybridroute.router`: the policy-driven router
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
