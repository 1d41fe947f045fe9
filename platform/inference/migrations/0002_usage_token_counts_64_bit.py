"""The ledger's token counts in 64 bits: a row's total (prompt + completion) and sums
over rows computed in SQL cannot overflow a 32-bit integer."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0001_pool_backends_and_ledger"),
    ]

    operations = [
        migrations.AlterField(
            model_name="usagerecord",
            name="completion_tokens",
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.AlterField(
            model_name="usagerecord",
            name="prompt_tokens",
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.AlterField(
            model_name="usagerecord",
            name="reserved_tokens",
            field=models.PositiveBigIntegerField(default=0),
        ),
    ]
