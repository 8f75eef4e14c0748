"""Course plumbing: run the labs, grade submissions, make student notebooks.

The notebooks' results are stored by ``labkit.records`` and ``labkit.claims`` (lesson helpers);
the modules here read them back.

| module   | what                                                                          |
|----------|-------------------------------------------------------------------------------|
| kernels  | Jupyter kernels for headless runs and where their state lives                 |
| runner   | ``labkit run``: execute labs under papermill, summary.json                    |
| report   | the self-contained HTML report of a run                                       |
| assign   | student notebooks from the solution notebooks; the release layout             |
| release  | ``labkit assign``: the student folder and zip (notebooks, data, README)       |
| publish  | executed runs into the committed notebooks, without papermill's cell          |
| tamper   | the static scan of student-written cells (the grader's first line)            |
| rubric   | ``Check``, ``Rubric``, ``load_rubric``: data/rubrics/labNN.toml, validated    |
| sandbox  | bubblewrap + limits: where a submission's code runs, cut off from the rest    |
| trusted  | hidden tests and recomputations in a fresh interpreter, outside the kernel    |
| harness  | the program of that interpreter (``python -m labkit.course.harness``)         |
| scoring  | points per check from the records and the trusted answers                     |
| grading  | ``labkit grade``: scan, run in a sandbox, check and score each submission     |
"""
