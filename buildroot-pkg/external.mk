include $(sort $(wildcard $(BR2_EXTERNAL_KONSUL_PATH)/package/*/*.mk))
