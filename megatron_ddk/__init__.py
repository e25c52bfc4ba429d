"""megatron-ddk: DDK (Distilling Domain Knowledge, arXiv 2407.16154) on megatron-core.

Importing the package has no side effects; entry points call
``megatron_ddk.platform.startup.prepare_process()`` before they build anything.
"""

__version__ = "0.1.0"
