"""qat.coverage's table: rows with any constructor kwargs, and what a failed row shows."""

from qat.coverage import table


def test_rows_show_their_kwargs_of_any_type_and_failures():
    rows = [{"arch": "EfficientNetV2B0", "kwargs": {"include_preprocessing": False,
                                                    "alpha": 0.35, "pooling": "avg"},
             "qat": "ok", "qat_agreement": 0.99443, "float_acc": 0.95, "float_epochs": 5},
            {"arch": "ConvNeXtTiny", "qat": "fails", "qat_error": "ConfigError: no rule"}]
    text = table(rows)
    assert "| EfficientNetV2B0 (include_preprocessing=False, alpha=0.35, pooling=avg) |" in text
    assert "| 0.9944 |" in text
    assert "- ConvNeXtTiny, qat: `ConfigError: no rule`" in text
