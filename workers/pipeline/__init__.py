"""The chest-CT pipeline as stages with declared inputs and outputs, composed by
`workers/processing.py`:

| stage | module | takes | gives |
|---|---|---|---|
| claim | `claim.py` | study UID, pipeline version | `JobTicket`, or why there is nothing to do |
| select | `select.py` | `JobTicket` | `Selected` (series UID, its files) |
| load | `load.py` | `Selected` | `dicom_io.series.Volume` |
| QA | `qa.py` | `Volume` | `ml.runtime.qa.QAReport` (analysable) |
| infer | `analysers.py`, `infer.py` | `Volume`, an `Analyser` | `Analysis` |
| follow-up | `followup.py`, `prior.py` | `JobTicket`, `Volume`, `Analysis` | `FollowUpResult` |
| write | `write.py` | `Volume`, `Analysis`, `FollowUpResult` | `Written` (SEG, SR, `Findings`) |
| record | `record.py` | `JobTicket`, the end state, `Written` | the job, outputs, exports, audit |

Follow-up gives each lesion its tracking and change since the prior, or the reason no prior was
used; a prior's problem never ends the study. A stage that ends the study for a reason people
read (not analysable, no suitable series) raises `Finished`; anything else propagates for the
task to retry. Imports `db`, `dicom_io`,
`ml.runtime`, `ml.runtime.baseline` and `workers.dicom_out`.
"""

from workers.pipeline.errors import Finished

__all__ = ["Finished"]
