"""The pipeline's machinery: pipeline.yaml and params.yaml read and checked, the stage deps read
off the code and the files the params name, dvc.yaml generated, one stage run with its paths.

    spec         pipeline.yaml as `Pipeline` / `StageSpec`
    codedeps     a stage's code deps: its module and every project file it imports, transitively
    filedeps     the content hashes of the files a stage's params point at (`reports/inputs/`)
    params       params.yaml validated against every stage's schema (pydantic), one line per problem
    params_edit  params.yaml edited in place, comments kept (used by `loraforge import-kohya`)
    params_doc   docs/params.md generated from the schemas (`loraforge sync-docs`)
    dvcgen       dvc.yaml from pipeline.yaml (`loraforge sync-dvc`)
    runner       `run_stage`: params, paths and the item store handed to a stage's `run`

May import `store`.
"""

MAY_IMPORT = ("store",)
