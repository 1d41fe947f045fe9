from django.db import migrations, models

import tenants.rls


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0005_conversation_run_agent"),
    ]

    operations = [
        # chat_message has the full-text GIN index (PostgreSQL only).
        tenants.rls.AddFieldBesidePostgresIndexes(
            model_name="message",
            name="steps",
            field=models.JSONField(blank=True, default=list),
        ),
    ]
