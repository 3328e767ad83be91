# Eight CPU devices for this directory only: it runs in its own process
# (tests/bindings/test_sharding.py starts it), so the rest of the suite keeps one device.
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
