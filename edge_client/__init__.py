"""The fedmpq edge agent: MQTT session, psutil profiling, local quantized training."""
