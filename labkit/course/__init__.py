"""Course plumbing: run the labs, grade submissions, make student notebooks.

The notebooks' results are stored by ``labkit.records`` and ``labkit.claims`` (lesson helpers);
the modules here read them back.

| module   | what                                                                          |
|----------|-------------------------------------------------------------------------------|
| kernels  | Jupyter kernels for headless runs and where their state lives                 |
| runner   | ``labkit run``: execute labs under papermill, summary.json                    |
| report   | the self-contained HTML report of a run                                       |
| assign   | ``labkit assign``: student notebooks from the solution notebooks              |
| tamper   | the static scan of student-written cells                                      |
| rubric   | ``Check``, ``Rubric``, ``load_rubric``: data/rubrics/labNN.toml, validated    |
| grading  | ``labkit grade``: prepare, run and score each submission, one CSV             |
"""
