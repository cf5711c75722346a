"""vmbuild: a YAML recipe in, a validated VMware job image out, and a runner that makes the
image behave like an ordinary batch process on an execute node."""

__version__ = "0.1.0"
