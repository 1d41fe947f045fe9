from django.db import migrations

import tenants.rls


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0002_initial"),
        ("tenants", "0002_plans_keys_invitations_audit"),
    ]

    operations = [
        tenants.rls.EnableRowLevelSecurity(table="chat_conversation"),
        tenants.rls.EnableRowLevelSecurity(table="chat_message"),
        tenants.rls.EnableRowLevelSecurity(table="chat_run"),
    ]
