"""Course plumbing: run the labs, record results, grade submissions, make student notebooks.

| module   | what                                                                          |
|----------|-------------------------------------------------------------------------------|
| kernels  | Jupyter kernels for headless runs and where their state lives                 |
| records  | ``record(name, value)``: results stored as display outputs of their own MIME  |
| runner   | ``labkit run``: execute labs under papermill, summary.json                    |
| report   | the self-contained HTML report of a run                                       |
| assign   | ``labkit assign``: student notebooks from the solution notebooks              |
| tamper   | the static scan of student-written cells                                      |
| grading  | rubrics and ``labkit grade``                                                  |
"""
