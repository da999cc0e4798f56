"""What Tandem says about itself in Version, `tandem version` and logs."""

from importlib.metadata import PackageNotFoundError, version

RUNTIME_NAME = "tandem"
CRI_API_VERSION = "v1"
KUBELET_API_VERSION = "0.1.0"

try:
    RUNTIME_VERSION = version("tandem")
except PackageNotFoundError:
    RUNTIME_VERSION = "0.0.0+unknown"
