"""The report's defaults, limits and file names: numpy-free, so that the command line reads
them without loading pyarrow (``sppjit --help`` stays instant)."""

DEFAULT_EPOCHS = 100
DEFAULT_TOP = 32
MAX_EPOCHS = 100_000
MAX_TOP = 4096

PLOT_FILES = {
    "exits_over_time": "exits_over_time.png",
    "violations_heatmap": "violations_heatmap.png",
    "compare_bars": "compare_bars.png",
}
STATS_FILES = {
    "per_page": "per_page.parquet",
    "per_subpage": "per_subpage.parquet",
    "epochs": "epochs.parquet",
}
REPORT_FILE = "report.json"
