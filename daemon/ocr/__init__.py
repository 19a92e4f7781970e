"""OCR: hardware probe and provider choice, onnxruntime sessions, engines, page decoding.

Never imports the store: results go back to the pipeline as plain `PageResult` values.
"""
