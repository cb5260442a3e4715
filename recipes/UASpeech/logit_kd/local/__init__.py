"""The recipe's modules; the jobs at the recipe's root import them as ``local.<module>``.

Importing the package drops one warning SpeechBrain logs when it is used without torchvision
(which it needs only to save image figures, never here): it opened every command, error paths
included, and is not the user's concern.
"""

import logging

logging.getLogger("speechbrain.utils.train_logger").addFilter(lambda record: "torchvision" not in record.getMessage())
