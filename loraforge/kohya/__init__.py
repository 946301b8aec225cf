"""Coming from kohya: kohya_ss GUI and sd-scripts configs (JSON or TOML, with a dataset config)
read and turned into params.yaml (`loraforge import-kohya`).

    config    the kohya config read: its keys, its defaults, its dataset TOML
    importer  the params.yaml edit that config means, and what could not be carried over

May import `store` and `pipeline`.
"""

MAY_IMPORT = ("store", "pipeline")
