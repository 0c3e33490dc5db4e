"""Tools over a store for the people who share it: `store info`, `store report` and `store export`.

They read a store through its public reader and never change it; the format itself is `potstill.store`.
"""

from potstill.share.export import export_store
from potstill.share.info import format_info, store_info
from potstill.share.report import ReportConfig, write_report

__all__ = ["ReportConfig", "export_store", "format_info", "store_info", "write_report"]
