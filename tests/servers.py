"""The loopback servers live in segda.loopback (`segda bench stream` uses them too); tests import them from here."""

from segda.loopback import Faults, MotoS3, Traffic, free_port, http_file_server  # noqa: F401
