"""Tools over a store for the people who share it: `store info`, `store report`, `store export` and
`store publish`.

They read a store through its public reader and never change it; the format itself is `potstill.store`.
"""

from potstill.share.export import export_store
from potstill.share.info import format_info, store_info
from potstill.share.publish import publish_store, push_folder
from potstill.share.report import ReportConfig, write_report

__all__ = ["ReportConfig", "export_store", "format_info", "publish_store", "push_folder", "store_info", "write_report"]
